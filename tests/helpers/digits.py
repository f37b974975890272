"""An MLP (64-256-256-10) trained on scikit-learn's digits (1797 8x8 images) with
fusedopt.AdamW, lr 1e-3, 300 steps of 64: how far 4-bit state's final loss ends from
float32 state's (tests/test_4bit.py, bench/maps_4bit.py engine)."""
import torch

import fusedopt


def final_loss(state_dtype, seed=0, steps=300):
    """The mean of the last 20 minibatch losses; the model from torch.manual_seed(seed),
    the minibatches from a generator seeded seed + 1."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10))
    opt = fusedopt.AdamW(model.parameters(), lr=1e-3, state_dtype=state_dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[-20:]) / 20
