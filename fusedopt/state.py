"""``optimizer.state`` that counts its changes, so that a step knows in O(1) whether the
state tensors its plan points at are still the ones the user sees.

torch keeps ``state`` as a ``defaultdict(dict)``; users reset it (``state.clear()``,
``del state[p]``, ``state[p]["momentum_buffer"] = t``) and torch.optim honours that at
the next step.  Here ``State`` is a defaultdict whose every mutation, and every mutation
of one of its per-param dicts, bumps ``State.changes``; a plan remembers the count it was
built at and is rebuilt when it moved.  Pickling and deepcopy give plain equivalents back
through the same classes.

Also here: what a state dict must fit to be loaded, the dtypes its state keeps, and the
mark of the map its 4-bit second moments are codes of (``MAPS4``).
"""
from collections import defaultdict

import torch

from . import quant
from .quant import check_maps
from .bucket import state_dtype


class Entry(dict):
    """One param's state dict; tells its owner about every change."""

    __slots__ = ("owner",)

    def __init__(self, *args, owner=None, **kw):
        super().__init__(*args, **kw)
        self.owner = owner

    def _bump(self):
        if self.owner is not None:
            self.owner.changes += 1

    def __reduce__(self):
        return Entry, (dict(self),)


def _counting(name):
    base = getattr(dict, name)

    def method(self, *args, **kw):
        self._bump()
        return base(self, *args, **kw)
    method.__name__ = name
    return method


_MUTATORS = ("__setitem__", "__delitem__", "clear", "pop", "popitem", "setdefault", "update",
             "__ior__")
for _name in _MUTATORS:
    setattr(Entry, _name, _counting(_name))


class State(defaultdict):
    """torch.optim's ``defaultdict(dict)`` of per-param state, counting changes."""

    def __init__(self, *args, **kw):
        super().__init__(None, *args, **kw)
        self.changes = 0
        for k, v in list(dict.items(self)):
            dict.__setitem__(self, k, _adopt(self, v))

    def _bump(self):
        self.changes += 1

    def __missing__(self, key):
        entry = Entry(owner=self)
        dict.__setitem__(self, key, entry)
        return entry

    def __setitem__(self, key, value):
        self.changes += 1
        dict.__setitem__(self, key, _adopt(self, value))

    def __reduce__(self):
        return State, (dict(self),)

    def __copy__(self):
        return State(dict(self))


    def update(self, *args, **kw):
        for k, v in dict(*args, **kw).items():
            self[k] = v

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]

    def __ior__(self, other):
        self.update(other)
        return self


for _name in ("__delitem__", "clear", "pop", "popitem"):
    setattr(State, _name, _counting(_name))


def _adopt(owner, value):
    """A per-param dict as an Entry of ``owner`` (a plain dict is copied into one, as
    torch.optim copies what it loads)."""
    if isinstance(value, Entry):
        if value.owner is None or value.owner is owner:
            value.owner = owner
            return value
    if isinstance(value, dict):
        return Entry(value, owner=owner)
    return value


def check_loaded(state_dict, params, scalars, shape):
    """Refuse a state dict (before anything is loaded) where a state tensor does not fit
    its param: every state tensor has the shape ``shape(name, p)`` (the param's but for
    Adafactor's factors, and 4-bit codes and their absmax: quant.codes_shape) but the step
    counter and the other ``scalars`` (one element).  Said now, rather than at a step (torch) or never (a kernel).  ``params``: the
    optimizer's, in the order of the state dict's param ids.  4-bit codes of other maps
    than this version's: refused (check_maps)."""
    check_maps(state_dict)
    saved = state_dict["state"]
    ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    for i, p in zip(ids, params):
        st = saved.get(i, {})
        four = {k for k, v in st.items() if torch.is_tensor(v) and v.dtype == torch.uint8
                and torch.is_tensor(st.get(k + quant.ABSMAX))
                and quant.bits_of(v, st[k + quant.ABSMAX]) == 4}  # (4-bit codes)
        for k, v in st.items():
            scalar = k in ("step", *scalars)
            if k in four:
                want = quant.codes_shape(p, 4)
            elif k.endswith(quant.ABSMAX) and k[:-len(quant.ABSMAX)] in four:
                want = (quant.nblocks(p.numel(), quant.BLOCK4),)
            else:
                want = quant.absmax_shape(p) if k.endswith(quant.ABSMAX) else shape(k, p)
            if torch.is_tensor(v) and (v.numel() != 1 if scalar else v.shape != want):
                raise RuntimeError(
                    f"loaded state dict has state[{i}][{k!r}] of shape {tuple(v.shape)}, "
                    f"but " + ("it is a scalar" if scalar else
                               f"param {i} has shape {tuple(p.shape)}" if want == p.shape
                               else f"{k!r} of param {i} has shape {tuple(want)}"))


def keep_dtypes(state_dict, groups, state):
    """After torch's load_state_dict, which casts all state to the param's dtype: the
    float32 moments and master copies of a bfloat16 param (state_dtype, master_weights)
    and 8-bit codes and their absmax (uint8, float32) as ``state_dict`` has them."""
    saved = state_dict["state"]
    ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    owners = [(p, g) for g in groups for p in g["params"]]
    for i, (p, group) in zip(ids, owners):
        for k, v in saved.get(i, {}).items():
            if k != "step" and torch.is_tensor(v) and v.dtype != p.dtype \
                    and (k == "master" or v.dtype == state_dtype(group, p)
                         or v.dtype == torch.uint8 or k.endswith(quant.ABSMAX)):
                state[p][k] = v.to(p.device, copy=True)
