"""A small MLP trained a few hundred steps on fixed random data, in float32 or bfloat16:
how far a low-precision option's run ends from the float32 run (tests/test_kahan.py,
bench/precision.py's table)."""
import torch

import fusedopt


def mlp(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 1)).to(dtype)


def train(dtype, steps=200, make=None, after_step=None, lr=1e-4, **kw):
    """The model's params (float32, flattened) after ``steps`` AdamW steps (lr 1e-4, torch's
    other defaults: weight_decay 0.01; each update is below half a bfloat16 ulp of most
    weights) regressing sin(x @ w), and the optimizer.  ``make(params, lr=, **kw)`` builds
    another optimizer (default fusedopt.AdamW); ``after_step(opt)`` runs after each step."""
    model = mlp(dtype)
    opt = (make or fusedopt.AdamW)(model.parameters(), lr=lr, **kw)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(32, 1, generator=gen)
    for _ in range(steps):
        x = torch.randn(64, 32, generator=gen)
        loss = ((model(x.to(dtype)).float() - torch.sin(x @ w)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step(opt)
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()]), opt


def distance(x, ref):
    """|x - ref| / |ref| (2-norms over all params)."""
    return float((x - ref).norm() / ref.norm())


def state_bytes(opt):
    """Bytes of optimizer state per param (step counters left out): moments, master copies,
    compensations, 8-bit codes and their absmax."""
    params = [p for g in opt.param_groups for p in g["params"]]
    total = sum(v.numel() * v.element_size() for p in params for k, v in opt.state[p].items()
                if torch.is_tensor(v) and k != "step")
    return total / sum(p.numel() for p in params)


def optimi_adamw(params, lr, **kw):
    """optimi's own AdamW with torch.optim.AdamW's betas, eps and weight decay (optimi's
    defaults are (0.9, 0.99), 1e-6), its for-loop path."""
    import optimi
    return optimi.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                        foreach=False, triton=False, **kw)
