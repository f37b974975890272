"""Long safety soak: many random programs (tests/programs.py) under glibc's heap checks,
in chunks of subprocesses on all cores, then 10,000 steps of a small model with the
resident set measured after warm-up; with --dist, random distributed programs
(tests/dist_programs.py: FSDP2 and DDP on 2 gloo ranks), a process group per chunk.

    python bench/soak.py --programs 10000 --steps 10000
    python bench/soak.py --programs 0 --steps 0 --dist 1000
"""
import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
PROGRAMS = os.path.join(HERE, "..", "tests", "helpers", "programs.py")
DIST = os.path.join(HERE, "..", "tests", "helpers", "dist_programs.py")


def programs(total, chunk, engines, jobs):
    env = dict(os.environ, MALLOC_CHECK_="3", MALLOC_PERTURB_="165")

    def run(first):
        out = subprocess.run([sys.executable, PROGRAMS, str(first), str(min(chunk, total - first)),
                              engines], capture_output=True, text=True, env=env)
        return first, out

    failed, done, raised = [], 0, 0
    with ThreadPoolExecutor(jobs) as pool:
        for first, out in pool.map(run, range(0, total, chunk)):
            lines = out.stdout.splitlines()
            done += len(lines)
            raised += sum("raised" in line for line in lines)
            if out.returncode:
                failed.append((first, out.returncode, out.stderr[-1500:]))
    return done, raised, failed


def dist_programs(total, chunk):
    """One chunk at a time: each is a process group of 2 ranks, on their own 2 cores."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    failed, done = [], 0
    for first in range(0, total, chunk):
        out = subprocess.run([sys.executable, DIST, str(first), str(min(chunk, total - first))],
                             capture_output=True, text=True, env=env)
        done += len(out.stdout.splitlines())
        if out.returncode:
            failed.append((first, out.returncode, out.stderr[-1500:]))
    return done, failed


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def steps(n):
    import torch
    import fusedopt
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = fusedopt.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    marks = {}
    for s in range(n):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if s + 1 in (n // 10, n // 2, n):
            marks[s + 1] = rss()
    return marks, len(opt._plans)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--programs", type=int, default=10000)
    ap.add_argument("--chunk", type=int, default=250)
    ap.add_argument("--engines", default="both", help="numba, triton or both")
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=10000)
    ap.add_argument("--dist", type=int, default=0, help="distributed programs to run")
    ap.add_argument("--dist-chunk", type=int, default=100, help="programs per process group")
    args = ap.parse_args()
    t = time.time()
    done, raised, failed = programs(args.programs, args.chunk, args.engines, args.jobs)
    print(f"programs: {done} run, {raised} ended in an exception torch raised too, "
          f"{len(failed)} chunks failed, {time.time() - t:.0f} s")
    t = time.time()
    dist_done, dist_failed = dist_programs(args.dist, args.dist_chunk)
    if args.dist:
        print(f"distributed programs: {dist_done} run, {len(dist_failed)} chunks failed, "
              f"{time.time() - t:.0f} s")
    for first, rc, err in failed + dist_failed:
        print(f"  chunk from seed {first}: exit {rc}\n{err}")
    if args.steps:
        marks, plans = steps(args.steps)
        first = min(marks)
        print("resident set after step " + ", ".join(f"{k}: {v / 2**20:.1f} MiB"
                                                     for k, v in marks.items())
              + f" (growth after warm-up: {(marks[max(marks)] - marks[first]) / 2**10:.0f} "
              f"KiB); plans cached: {plans}")
    return 1 if failed or dist_failed or done < args.programs or dist_done < args.dist else 0


if __name__ == "__main__":
    sys.exit(main())
