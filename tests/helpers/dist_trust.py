"""The trust-ratio algorithms (LAMB, LARS, StableAdamW) under FSDP2, a scenario for
test_distributed.py, run as ``python dist_workers.py dist_trust:NAME WORLD DIR`` (every
rank asserting on its own).

* sharded:  each algorithm on fully_shard'ed params (dims of 33 and 5: uneven shards over
            2 ranks; 2 only: 3 would not split dist_workers' global batch) steps the params the unsharded single-process step does on the same
            global batches; LAMB with its global max_grad_norm clipping on every step.
* local:    the same with the trust ratios taken from each shard's own norms (the fused
            reduce pass on the local tensors, which plan.GroupSpec.trust keeps DTensor
            params away from): it must fail (the test expects this run to fail).
"""
import dataclasses

import torch

import dist_workers as W
import fusedopt
from fusedopt import plan

STEPS = 3
CLIP = 0.05  # LAMB's max_grad_norm: below the global norm of every step here (asserted)
RUNS = {"LAMB": dict(lr=1e-2, weight_decay=0.1, max_grad_norm=CLIP),
        "LARS": dict(lr=1e-2, weight_decay=0.1, nesterov=True, trust_coefficient=0.02),
        "StableAdamW": dict(lr=1e-2, weight_decay=0.1)}


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(W.DIM, 33), torch.nn.Tanh(),
                               torch.nn.Linear(33, 5))


def loss(m, step, rank, world):
    return m(W.batch(step, rank, world)).pow(2).mean()


def sharded(rank, world, mesh, out):
    assert any(p.shape[0] % world for p in model().parameters())  # uneven shards
    for name, hp in RUNS.items():
        whole, m = model(), W.shard(model(), mesh)
        ours, single = (getattr(fusedopt, name)(x.parameters(), **hp) for x in (m, whole))
        for s in range(STEPS):
            for x, o, r, w in ((m, ours, rank, world), (whole, single, 0, 1)):
                o.zero_grad()
                loss(x, s, r, w).backward()
                o.step()
            if name == "LAMB":
                norm = torch.linalg.vector_norm(torch.stack(
                    [p.grad.norm() for p in whole.parameters()]))
                assert norm > 2 * CLIP, norm  # the clipping acted
            # the same global batch (2 ranks): the grads differ only by the reduce-scatter's
            # order of summation (an ulp or so), which moves the params (|p| < 0.5) by an
            # ulp or two (measured: 3e-8 at most); trust ratios from the shards' own norms
            # move them by 2e-5 at the first step (the local scenario)
            for a, b in zip(W.full(m), W.full(whole)):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-7,
                                           msg=lambda e: f"{name} step {s}: {e}")
        assert all(type(p).__name__ == "DTensor" for p in m.parameters())
        apart = max((a - b).abs().max().item() for a, b in zip(W.full(m), W.full(whole)))
        print(f"rank {rank}: {name} on {world} shards within {apart:.3g} of one process")


def local(rank, world, mesh, out):
    right = plan._unfit  # the plan's checks as for an algorithm without trust ratios

    def unfit(spec, *args):
        return right(dataclasses.replace(spec, trust=False), *args)
    plan._unfit = unfit
    sharded(rank, world, mesh, out)
