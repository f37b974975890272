"""8-bit state on a GPU: the compiled Triton engine's codes, absmax and params against the
Numba engine's on the CPU, bit for bit (AdamW with amsgrad: three 8-bit slots, both maps;
float32 and bfloat16 params; sizes that cut blocks and chunks short).
    python bench/check_8bit.py        # exit status 1 if any case differs
"""
import sys

import torch

import fusedopt

SHAPES = [(300, 77), (4096,), (70000,), (100,), ((1 << 20) + 3,)]
CASES = {"float32": (torch.float32, {}),
         "bfloat16 + master_weights": (torch.bfloat16, dict(master_weights=True)),
         "bfloat16 + stochastic_rounding": (torch.bfloat16, dict(stochastic_rounding=True)),
         "bfloat16 + kahan_sum": (torch.bfloat16, dict(kahan_sum=True))}


def _run(device, backend, dtype, extra, steps=5):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype).to(device)) for s in SHAPES]
    opt = fusedopt.AdamW(ps, lr=1e-2, amsgrad=True, state_dtype=torch.uint8, backend=backend,
                         **extra)
    if "sr_seed" in opt.param_groups[0]:
        opt.param_groups[0]["sr_seed"] = 1234
    grads = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=grads).to(dtype).to(device)
        opt.step()
    state = {i: {k: v.cpu() for k, v in st.items()} for i, st in opt.state_dict()["state"].items()}
    return [p.detach().cpu() for p in ps], state


def main():
    failed = 0
    for name, (dtype, extra) in CASES.items():
        (pa, sa), (pb, sb) = _run("cpu", "numba", dtype, extra), _run("cuda", "triton", dtype, extra)
        bad = [f"param {i}" for i, (x, y) in enumerate(zip(pa, pb)) if not torch.equal(x, y)]
        bad += [f"state {i} {k}" for i in sa for k in sa[i]
                if k != "step" and not torch.equal(sa[i][k], sb[i][k])]
        codes = sum(v.numel() for st in sa.values() for v in st.values() if v.dtype == torch.uint8)
        print(f"{name:32} {'equal' if not bad else 'DIFFER: ' + ', '.join(bad[:6])} "
              f"({codes} codes, {len(pa)} params, 5 steps)")
        failed += bool(bad)
    return failed


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
