"""Candidate 4-bit maps for AdamW's moments, simulated: the MLP of tests/test_4bit.py's
digits run (64-256-256-10 on scikit-learn's digits, AdamW lr 1e-3, 300 steps of 64, mean of
the last 20 losses) in float64 torch, each coded slot of a param over quant.MIN_NUMEL
dequantized before the step and coded again after it (blocks of 128, a code the count of
the map's midpoints below y = x / absmax, as the engines code).
    python bench/maps_4bit.py [SEEDS]
prints each pair of maps' final loss per seed and its gap to float32 state's."""
import sys

import torch

from fusedopt import quant


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


def candidates():
    s4 = quant.dynamic_map(True, 4).double()
    lin = torch.arange(1, 17, dtype=torch.float64) / 16
    out = {"float32": (None, None),
           "8-bit": ((quant.dynamic_map(True).double(), mids(quant.dynamic_map(True))),
                     (quant.dynamic_map(False).double(), mids(quant.dynamic_map(False)))),
           "torchao (dyn3 / linear)": ((s4, mids(s4)), (lin, mids(lin)))}
    for lo in (1e-2, 1e-3, 1e-4, 1e-6):
        g = geo(lo)
        out[f"dyn3 / geo {lo:g}"] = ((s4, mids(s4)), (g, mids(g)))
        out[f"dyn3 / geo {lo:g} geo-mid"] = ((s4, mids(s4)), (g, mids(g, "geo")))
        out[f"- / geo {lo:g}"] = (None, (g, mids(g)))
    out["dyn3 / -"] = ((s4, mids(s4)), None)
    sym = lambda pos: torch.cat([-pos.flip(0), pos])
    extra = lambda q, x: torch.cat([q, torch.tensor([x], dtype=torch.float64)]).sort().values
    cands = {
        "dyn3 -1": extra(sym(torch.cat([s4[9:15], torch.ones(1, dtype=torch.float64)]).unique()) if False else torch.cat([sym(torch.cat([s4[9:15], torch.ones(1, dtype=torch.float64)])), torch.zeros(1, dtype=torch.float64)]).sort().values, float(s4[8])),
        "lin odd": sym(torch.arange(1, 16, 2, dtype=torch.float64) / 15),
        "lin0 +-k/7": extra(torch.cat([sym(torch.arange(1, 8, dtype=torch.float64) / 7), torch.zeros(1, dtype=torch.float64)]).sort().values, 1 / 14),
    }
    for lo in (1e-1, 3e-2, 1e-2, 1e-3):
        cands[f"geo+- {lo:g}"] = sym(geo(lo, 8))
        cands[f"geo0 {lo:g}"] = extra(torch.cat([sym(geo(lo, 7)), torch.zeros(1, dtype=torch.float64)]).sort().values, lo / 2)
    lin0 = cands["lin0 +-k/7"]
    for p in (0.75, 1.5):
        cands[f"lin0^{p:g}"] = lin0.sign() * lin0.abs() ** p
    cands["lin0 top"] = extra(torch.cat([sym(torch.arange(1, 8, dtype=torch.float64) / 7), torch.zeros(1, dtype=torch.float64)]).sort().values, 13 / 14)
    for lo in (0.1, 0.05, 0.03, 0.02):
        g = geo(lo)
        out[f"- / geo {lo:g}"] = (None, (g, mids(g)))
    for p in (2, 3, 4):
        u = lin ** p
        out[f"- / lin^{p}"] = (None, (u, mids(u)))
    de0 = []
    for i in range(4):  # the unsigned dynamic map of 4 decades, 2^i parts each, and 1
        edges = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float64)
        de0 += ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - 3)).tolist()
    de0 = torch.tensor(de0 + [1.0], dtype=torch.float64)
    l0 = (cands["lin0 +-k/7"], mids(cands["lin0 +-k/7"]))
    out["- / de0"] = (None, (de0, mids(de0)))
    out["dyn3 / de0"] = ((s4, mids(s4)), (de0, mids(de0)))
    out["lin0 / de0"] = (l0, (de0, mids(de0)))
    for lo in (1e-2, 1e-3):
        out[f"lin0 / geo {lo:g}"] = (l0, (geo(lo), mids(geo(lo))))
    out["lin0 / lin^2"] = (l0, (lin ** 2, mids(lin ** 2)))
    for lo in (3e-3, 1e-3):
        g = geo(lo)
        out[f"lin0 / geo {lo:g} geo-mid"] = (l0, (g, mids(g, "geo")))
    out["lin0 / geo 0.003"] = (l0, (geo(3e-3), mids(geo(3e-3))))
    for k, q in cands.items():
        assert q.numel() == 16 and torch.all(q[1:] > q[:-1]), (k, q)
        out[f"{k} / -"] = ((q, mids(q)), None)
    return out


if __name__ == "__main__":
    seeds = [int(s) for s in sys.argv[1].split(",")] if len(sys.argv) > 1 else [0]
    want = sys.argv[2].split(";") if len(sys.argv) > 2 else None
    base = {s: run(seed=s, data_seed=s + 1) for s in seeds}
    for name, (f, s) in candidates().items():
        if want and name not in want and name != "float32":
            continue
        r = [run(f, s, seed=sd, data_seed=sd + 1) for sd in seeds]
        gaps = " | ".join(f"{v:.4f} ({100 * (v / base[sd][0] - 1):+.1f}%) {w:.4f} "
                          f"({100 * (w / base[sd][1] - 1):+.1f}%)" for (v, w), sd in zip(r, seeds))
        print(f"{name:32s} {gaps}", flush=True)
