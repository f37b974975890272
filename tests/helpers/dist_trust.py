"""The trust-ratio algorithms (LAMB, LARS, StableAdamW) under FSDP2, a scenario for
test_distributed.py, run as ``python dist_workers.py dist_trust:NAME WORLD DIR`` (every
rank asserting on its own).

* sharded:  each algorithm on fully_shard'ed params (dims of 33, 5 and 1: uneven shards
            over 2 ranks, empty ones on rank 1; 2 only: 3 would not split dist_workers'
            global batch), stepped fused (each shard's sums all-reduced before the trust
            ratios), steps the params the unsharded single-process step does on the same
            global batches; LAMB with its global max_grad_norm clipping acting every step.
* local:    the mutation: trust ratios from each shard's own norms (the reduce pass's
            sums not all-reduced, dtensor.whole_norms skipped) fail the comparison, for each
            algorithm (measured: LAMB 2.6e-5 and LARS 8.5e-7 off at the first step,
            StableAdamW, whose rate changes only where the RMS passes 1, 2.3e-3 at its
            second).
"""
import torch

import dist_workers as W
import fusedopt
from fusedopt import bucket

STEPS = 3
CLIP = 0.05  # LAMB's max_grad_norm: below the global norm of every step here (asserted)
RUNS = {"LAMB": dict(lr=1e-2, weight_decay=0.1, max_grad_norm=CLIP),
        "LARS": dict(lr=1e-2, weight_decay=0.1, nesterov=True, trust_coefficient=0.02),
        "StableAdamW": dict(lr=1e-2, weight_decay=0.1)}


def model():
    torch.manual_seed(0)
    L = torch.nn.Linear
    return torch.nn.Sequential(L(W.DIM, 33), torch.nn.Tanh(), L(33, 5), torch.nn.Tanh(), L(5, 1))


def loss(m, step, rank, world):
    return m(W.batch(step, rank, world)).pow(2).mean()


def sharded(rank, world, mesh, out, names=tuple(RUNS)):
    assert any(p.shape[0] < world for p in model().parameters())  # uneven, empty shards
    for name in names:
        hp = RUNS[name]
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
            # ulp or two (measured: 6e-8 at most); trust ratios from the shards' own norms
            # move them by 8.5e-7 or more (the local scenario)
            for a, b in zip(W.full(m), W.full(whole)):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-7,
                                           msg=lambda e: f"{name} step {s}: {e}")
        assert all(type(p).__name__ == "DTensor" for p in m.parameters())
        # the fused step took every shard (no param left to the twin's torch ops)
        assert all(not pl.fallback and pl.buckets for pl in ours._plans.values()), name
        apart = max((a - b).abs().max().item() for a, b in zip(W.full(m), W.full(whole)))
        print(f"rank {rank}: {name} on {world} shards within {apart:.3g} of one process")


def local(rank, world, mesh, out):
    bucket.whole_norms = lambda tensors, sums, p: sums  # each shard's own sums
    for name in RUNS:
        try:
            sharded(rank, world, mesh, out, (name,))
        except AssertionError as e:
            assert f"{name} step" in str(e), e
            continue
        raise AssertionError(f"{name}: trust ratios from the shards' own norms passed")
