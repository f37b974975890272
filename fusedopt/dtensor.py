"""DTensor facts that the bucket, the plan and the 8-bit state all need, without importing
torch.distributed.tensor (~0.6 s) where no program has."""
import math
import sys

import torch


def dtensor_class():
    """DTensor's class, or () while torch.distributed.tensor is not imported: importing it
    takes ~0.6 s, and a program with DTensors has imported it already."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", ()) if mod is not None else ()


def local(t):
    """The shard a DTensor holds on this rank (the engine updates local shards), else t."""
    return t._local_tensor if isinstance(t, dtensor_class()) else t


def mesh_dims(t):
    """The mesh dims a DTensor is sharded over (its norm is partial there), or None when a
    placement is neither a shard nor a replica (a partial grad: torch's own ops reduce it)."""
    dims = []
    for d, pl in enumerate(t.placements):
        if pl.is_shard():
            dims.append(d)
        elif not pl.is_replicate():
            return None
    return tuple(dims)


def whole_norms(tensors, v, p):
    """``v`` (a row or value per tensor, over its local shard: its p-norm; with p=1 a trust
    ratio's sums of squares) made the whole tensors' where a tensor is a DTensor: one
    all-reduce per (mesh, sharded dims), over each sharded dim's process group, in the order
    first seen (the same on every rank, whose tensors are the same params).  A shard's own
    norms are not its param's: a clip factor or trust ratio from them would differ from rank
    to rank."""
    dt = dtensor_class()
    meshes = {}
    for i, t in enumerate(tensors):
        if dt and isinstance(t, dt):
            meshes.setdefault((t.device_mesh, mesh_dims(t)), []).append(i)
    for (mesh, dims), idx in meshes.items():
        sel = torch.tensor(idx, device=v.device)
        v[sel] = all_reduce_norms(v[sel], p, mesh, dims)
    return v


def all_reduce_norms(v, p, mesh, dims):
    """The norms of whole tensors from their shards' norms ``v`` (one collective per sharded
    mesh dim, over that dim's process group): DTensor's own reduction of a partial norm,
    x**p, a sum, x**(1/p), or a max for the inf norm, in the norms' dtype."""
    import torch.distributed as dist
    for d in dims:
        group = mesh.get_group(d)
        if p == math.inf:
            dist.all_reduce(v, dist.ReduceOp.MAX, group=group)
        else:
            v = v ** p
            dist.all_reduce(v, dist.ReduceOp.SUM, group=group)
            v = v ** (1.0 / p)
    return v
