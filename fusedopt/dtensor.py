"""DTensor facts that the bucket, the plan and the 8-bit state all need, without importing
torch.distributed.tensor (~0.6 s) where no program has."""
import sys


def dtensor_class():
    """DTensor's class, or () while torch.distributed.tensor is not imported: importing it
    takes ~0.6 s, and a program with DTensors has imported it already."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", ()) if mod is not None else ()


def local(t):
    """The shard a DTensor holds on this rank (the engine updates local shards), else t."""
    return t._local_tensor if isinstance(t, dtensor_class()) else t
