"""Peak memory of backward + step with and without gradient release, measured: a stack of
8 linear layers of 2560 x 2560 (52.5M params, 210 MB of float32 gradients), AdamW, a batch
of 32, in a fresh process per setting.

What is measured: the process's resident memory.  torch's CPU tensors come from glibc's
malloc (torch keeps no CPU allocator statistics, and tracemalloc sees only Python's own
allocator, not a tensor's memory), so each process runs with MALLOC_MMAP_THRESHOLD_=65536:
every tensor over 64 KiB is then its own mmap, returned to the kernel when freed, so the
resident set follows the live tensors (glibc's default threshold grows to 32 MiB after the
first free, and freed gradients would then stay resident in its heap).  After two warm-up
steps (state created, kernels loaded) and the forward, the peak (VmHWM) is reset by writing
5 to /proc/self/clear_refs; after backward + step + zero_grad it is read back.  Printed per
setting: the resident set before the backward, the peak during backward + step, and the
rise, the most over 3 measured steps (MiB).
    python bench/gradient_release.py [--bucket-mb 25]
"""
import argparse
import os
import subprocess
import sys

RUN = r"""
import sys, torch, fusedopt
mode, bucket_mb = sys.argv[1], float(sys.argv[2])
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(2560, 2560) for _ in range(8)])
release = mode == "release"
opt = fusedopt.AdamW(model.parameters(), lr=1e-4, gradient_release=release)
if release:
    fusedopt.prepare_for_gradient_release(model, opt, bucket_mb=bucket_mb)

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024

rise = []
for k in range(5):
    x = torch.randn(32, 2560)
    loss = model(x).square().mean()
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    loss.backward()
    opt.step()
    opt.zero_grad()
    if k >= 2:
        rise.append((status("VmHWM") - before, before, status("VmHWM")))
n = sum(p.numel() for p in model.parameters())
largest = max((sum(p.numel() * 4 for p in b.params) for b in model._gradient_release.buckets),
              default=0) if release else 0
r = max(rise)
print(n, r[1], r[2], r[0], largest / 2 ** 20)
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bucket-mb", type=float, default=25.0)
    args = ap.parse_args()
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    print(f"{'setting':10} {'params':>12} {'RSS before':>11} {'peak':>9} {'rise':>8} "
          f"{'largest bucket':>15}  (MiB)")
    for mode in ("normal", "release"):
        out = subprocess.run([sys.executable, "-c", RUN, mode, str(args.bucket_mb)],
                             capture_output=True, text=True, check=True, env=env).stdout.split()
        n, before, peak, rise, largest = int(out[0]), *map(float, out[1:])
        big = f"{largest:15.1f}" if mode == "release" else f"{'-':>15}"
        print(f"{mode:10} {n:12,d} {before:11.1f} {peak:9.1f} {rise:8.1f} {big}")


if __name__ == "__main__":
    main()
