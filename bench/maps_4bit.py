"""Candidate 4-bit maps for AdamW's moments, simulated: the MLP of tests/test_4bit.py's
digits run (64-256-256-10 on scikit-learn's digits, AdamW lr 1e-3, 300 steps of 64, mean of
the last 20 losses) in float64 torch, each coded slot of a param over quant.MIN_NUMEL
dequantized before the step and coded again after it (blocks of 128, a code the count of
the map's midpoints below y = x / absmax, as the engines code).
    python bench/maps_4bit.py [SEEDS [PAIRS]]
prints each pair of maps' final loss per seed (the mean of the last 20 losses, then the
loss on the whole set) and its gap to float32 state's.  SEEDS: "0,1,2"; PAIRS: "FIRST /
SECOND;..." (names of SIGNED and UNSIGNED below, "-" for float64; default: DEFAULT).
Seed s: torch.manual_seed(s) for the model, data seed s + 1 (the test's: seed 0).
    python bench/maps_4bit.py engine SEEDS
runs fusedopt.AdamW itself (float32, 8-bit, 4-bit state) on those seeds instead."""
import os
import sys

import torch

from fusedopt import quant

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                "helpers"))
from digits import final_loss  # noqa: E402


def geo(lo, n=16):
    """n values from lo to 1, evenly spaced in log."""
    return torch.logspace(0, 1, n, base=lo, dtype=torch.float64).flip(0)


def mids(q, kind="arith"):
    q = q.double()
    if kind == "geo":  # geometric midpoints (between values of one sign)
        m = torch.sqrt(q[:-1].abs() * q[1:].abs()) * torch.sign(q[:-1] + q[1:])
        return torch.where(q[:-1] * q[1:] > 0, m, (q[:-1] + q[1:]) / 2)
    return (q[:-1] + q[1:]) / 2


def code(x, q, m, size=128):
    """Encode then decode x (flattened) in blocks of ``size`` with map q and midpoints m."""
    flat = x.reshape(-1)
    pad = (-flat.numel()) % size
    b = torch.nn.functional.pad(flat, (0, pad)).view(-1, size)
    absmax = b.abs().amax(1, keepdim=True).float().double()
    y = torch.where(absmax > 0, b / absmax.clamp(min=1e-300), 0.0)
    k = torch.searchsorted(m.contiguous(), y.contiguous(), side="left")
    return (q[k] * absmax).reshape(-1)[:flat.numel()].view(x.shape)


def run(first=None, second=None, seed=0, data_seed=1, steps=300):
    """Final loss of the digits run with AdamW whose exp_avg / exp_avg_sq are coded by
    first / second ((map, midpoints) or None for float64)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float64) / 16
    y = torch.tensor(d.target)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10)).double()
    ps = list(model.parameters())
    st = [(torch.zeros_like(p), torch.zeros_like(p)) for p in ps]
    lr, b1, b2, eps, wd = 1e-3, 0.9, 0.999, 1e-8, 1e-2
    gen = torch.Generator().manual_seed(data_seed)
    losses = []
    for t in range(1, steps + 1):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        model.zero_grad()
        loss.backward()
        losses.append(loss.item())
        with torch.no_grad():
            for i, p in enumerate(ps):
                m, v = st[i]
                g = p.grad
                p.mul_(1 - lr * wd)
                m = m * b1 + (1 - b1) * g
                v = v * b2 + (1 - b2) * g * g
                den = (v / (1 - b2 ** t)).sqrt() + eps
                p.add_(-(lr / (1 - b1 ** t)) * m / den)
                if p.numel() >= quant.MIN_NUMEL:
                    if first is not None:
                        m = code(m, *first)
                    if second is not None:
                        v = code(v, *second)
                st[i] = (m, v)
    with torch.no_grad():
        whole = torch.nn.functional.cross_entropy(model(x), y).item()
    return sum(losses[-20:]) / 20, whole


def _sym(pos, *more):
    """A signed map: the positive values, their negatives, and ``more``."""
    pos = torch.as_tensor(pos, dtype=torch.float64)
    return torch.cat([-pos, pos, torch.tensor(more, dtype=torch.float64)]).sort().values


def _dynamic(decades):
    """The unsigned dynamic map of ``decades`` decades (2^i parts in decade i) and 1, no 0."""
    out = [1.0]
    for i in range(decades):
        edges = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float64)
        out += ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - decades + 1)).tolist()
    return torch.tensor(sorted(out), dtype=torch.float64)


def _maps():
    s4 = quant.dynamic_map(True, 4).double()
    k7 = torch.arange(1, 8, dtype=torch.float64) / 7
    signed = {"dyn3": s4,  # torchao's (and this library's)
              "dyn3 -1": _sym(torch.cat([s4[9:15], torch.ones(1)]), 0.0, float(s4[8])),
              "lin odd": _sym(torch.arange(1, 16, 2, dtype=torch.float64) / 15),
              "lin0": _sym(k7, 0.0, 1 / 14), "lin0 top": _sym(k7, 0.0, 13 / 14)}
    for p in (0.75, 1.5):
        signed[f"lin0^{p:g}"] = signed["lin0"].sign() * signed["lin0"].abs() ** p
    for lo in (1e-1, 3e-2, 1e-2, 1e-3):
        signed[f"geo+- {lo:g}"] = _sym(geo(lo, 8))  # (without 0)
        signed[f"geo0 {lo:g}"] = _sym(geo(lo, 7), 0.0, lo / 2)
    lin = torch.arange(1, 17, dtype=torch.float64) / 16
    unsigned = {"linear": lin, "de0": _dynamic(4)}  # torchao's; dynamic, 0.00055 for 0
    for p in (2, 3, 4):
        unsigned[f"lin^{p}"] = lin ** p
    for lo in (1e-1, 5e-2, 3e-2, 2e-2, 1e-2, 3e-3, 1e-3, 1e-4, 1e-6):
        unsigned[f"geo {lo:g}"] = geo(lo)
    for v in list(signed.values()) + list(unsigned.values()):
        assert v.numel() == 16 and torch.all(v[1:] > v[:-1])
    return signed, unsigned


# "geo-mid": geometric midpoints (quant.log_map's are those of "geo 0.001 geo-mid")
DEFAULT = ["dyn3 / linear", "dyn3 / -", "- / linear", "- / geo 0.001", "dyn3 / geo 0.001",
           "dyn3 / geo 0.001 geo-mid", "lin0 / -", "lin0 / geo 0.001 geo-mid"]


def pair(name):
    """((map, midpoints) or None, the same) of a PAIRS entry."""
    signed, unsigned = _maps()
    first, second = (x.strip() for x in name.split("/"))
    if second.endswith(" geo-mid"):
        q = unsigned[second[:-len(" geo-mid")]]
        second = (q, mids(q, "geo"))
    elif second != "-":
        second = (unsigned[second], mids(unsigned[second]))
    if first != "-":
        first = (signed[first], mids(signed[first]))
    return (None if first == "-" else first), (None if second == "-" else second)


if __name__ == "__main__" and sys.argv[1:2] == ["engine"]:
    for sd in [int(s) for s in sys.argv[2].split(",")]:
        r = {k: final_loss(v, sd) for k, v in (("float32", None), ("8-bit", torch.uint8),
                                                ("4-bit", torch.uint4))}
        print(sd, " ".join(f"{k} {v:.4f} ({v / r['float32'] - 1:+.2%})" for k, v in r.items()))
elif __name__ == "__main__":
    seeds = [int(s) for s in sys.argv[1].split(",")] if len(sys.argv) > 1 else [0]
    names = sys.argv[2].split(";") if len(sys.argv) > 2 else DEFAULT
    base = {s: run(seed=s, data_seed=s + 1) for s in seeds}
    for name in names:
        r = [run(*pair(name), seed=sd, data_seed=sd + 1) for sd in seeds]
        gaps = " | ".join(f"{v:.4f} ({100 * (v / base[sd][0] - 1):+.1f}%) {w:.4f} "
                          f"({100 * (w / base[sd][1] - 1):+.1f}%)" for (v, w), sd in zip(r, seeds))
        print(f"{name:32s} {gaps}", flush=True)
