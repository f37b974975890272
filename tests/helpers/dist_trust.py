"""The trust-ratio algorithms (LAMB, LARS, StableAdamW) under FSDP2, a scenario for
test_distributed.py, run as ``python dist_workers.py dist_trust:NAME WORLD DIR`` (every
rank asserting on its own).

* sharded:  each algorithm on fully_shard'ed params (dims of 33 and 5: uneven shards over
            2 ranks) steps the params the unsharded single-process step does on the same
            global batches; LAMB with its global max_grad_norm clipping on every step.
* local:    the same with the trust ratios taken from each shard's own norms (the fused
            reduce pass on the local tensors, which plan.GroupSpec.trust keeps DTensor
            params away from): it must fail (the test expects this run to fail).
"""
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
            # the same global batch: the grads differ only by the reduce-scatter's order of
            # summation (an ulp or so); 3 steps of lr=1e-2 carry that into the params far
            # below 1e-6 (a per-shard trust ratio moves them by ~1e-3: the local scenario)
            W.assert_close(W.full(m), W.full(whole), f"{name} step {s}")
        assert all(type(p).__name__ == "DTensor" for p in m.parameters())


def local(rank, world, mesh, out):
    plan._dtensor = lambda: ()  # no param is a DTensor to the plan: the engines take shards
    sharded(rank, world, mesh, out)
