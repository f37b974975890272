"""8-bit against float32 state on each kind of x86 CPU this one can stand in for: the Numba
engine compiled for the portable loops (x86-64-v2), AVX2 (AMD Zen 2/3, Intel before Ice
Lake: kernels/numba_avx2.py), AVX-512 without VBMI, and this CPU itself.  Per kind, in a
fresh process compiled for it (NUMBA_CPU_NAME / NUMBA_CPU_FEATURES), AdamW on GPT-2-124M
shapes with float32 state and with 8-bit state and the float32 memory roof, timed in
alternating rounds (median of each): the ratio is side by side in one run.

    python bench/cpu_kinds_8bit.py --rounds 5 [--kinds avx2,native]

Code compiled for a CPU runs here at this CPU's speed per instruction, so a kind's figure
is what its instructions cost on this machine, not on that CPU.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

from fusedopt.kernels.numba_avx2 import CPU_KINDS

KINDS = {**CPU_KINDS, "native": None}


def _child(rounds):
    # in the process compiled for one kind: its timings as JSON on stdout
    import time

    import torch

    import fusedopt
    from fusedopt import benchmark, workloads
    from fusedopt.kernels import numba_quant
    shapes = workloads.WORKLOADS["gpt2-124m"]()
    steps = {}
    for name, dtype in (("float32", torch.float32), ("8-bit", torch.uint8)):
        ps = benchmark._make(shapes, torch.device("cpu"))
        opt = fusedopt.AdamW(ps, lr=1e-3, state_dtype=dtype)
        for _ in range(2):  # compile or load, plan, state
            opt.step()
        steps[name] = opt.step
    numel = sum(p.numel() for p in ps)
    steps["roof"] = benchmark.roof(numel, 4, 3, torch.device("cpu"))[0]  # AdamW fp32: 4r 3w
    times = {k: [] for k in steps}
    for _ in range(rounds):
        for k, fn in steps.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    per_value = _blocks(rounds)
    path = ("VBMI permutes" if numba_quant.VBMI else "AVX-512 codes" if numba_quant.AVX512
            else "AVX2" if numba_quant.AVX2 else "portable loops")
    print(json.dumps({"path": path, **per_value, **{k: statistics.median(v) * 1e3 for k, v in times.items()}}))


def _blocks(rounds, n=1 << 18):
    # ns per value of numba_quant's requantize and dequantize over whole blocks, the signed
    # map (first moments), one thread
    import time

    import numba
    import numpy as np

    from fusedopt import quant
    from fusedopt.kernels import numba_quant as nq
    B = nq.QBLOCK

    @numba.njit(error_model="numpy")
    def codes(f, c, T, absmax):
        for b in range(len(absmax)):
            absmax[b] = nq.requantize(f[b * B:(b + 1) * B], c[b * B:(b + 1) * B], B, T, 1)

    @numba.njit(error_model="numpy")
    def values(f, c, T, absmax):
        for b in range(len(absmax)):
            nq.dequantize(f[b * B:(b + 1) * B], c[b * B:(b + 1) * B], B, T, absmax[b])

    T = quant.engine_table().numpy()[1].copy()
    f = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    c, absmax = np.zeros(n, np.uint8), np.zeros(n // B, np.float32)
    out = {}
    for name, fn in (("codes", codes), ("values", values)):
        fn(f, c, T, absmax)
        ts = []
        for _ in range(max(rounds, 5) * 4):
            t = time.perf_counter()
            fn(f, c, T, absmax)
            ts.append(time.perf_counter() - t)
        out[name] = statistics.median(ts) / n * 1e9
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--kinds", default=",".join(KINDS))
    a = ap.parse_args(argv)
    from numba.core.registry import cpu_target
    have = set(cpu_target.target_context.codegen()._tm_features.split(","))
    print(f"{'kind':9} {'8-bit path':15} {'fp32 ms':>8} {'8-bit ms':>9} {'8-bit/fp32':>10} "
          f"{'roof ms':>8} {'fp32 %roof':>10} {'codes ns':>8} {'values ns':>9}")
    for kind in a.kinds.split(","):
        env = dict(os.environ)
        if KINDS[kind]:
            cpu, features = KINDS[kind]
            if not set(features.split(",")) <= have:
                print(f"{kind:9} (this CPU cannot run code compiled for {cpu})")
                continue
            env.update(NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES=features)
        r = subprocess.run([sys.executable, __file__, "--child", str(a.rounds)], env=env,
                           capture_output=True, text=True)
        if r.returncode:
            print(f"{kind:9} failed: {r.stderr[-500:]}")
            continue
        t = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{kind:9} {t['path']:15} {t['float32']:8.1f} {t['8-bit']:9.1f} "
              f"{t['8-bit'] / t['float32']:10.2f} {t['roof']:8.1f} "
              f"{100 * t['roof'] / t['float32']:9.1f}% {t['codes']:8.3f} {t['values']:9.3f}",
              flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(int(sys.argv[2]))
    else:
        main()
