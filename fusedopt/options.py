"""fusedopt's own constructor keywords (torch.optim has none of them): their defaults, the
checks that refuse a bad value with an error naming the keyword, and the constructor
signature torch's plus them."""
import inspect

import torch

# FusedOptimizer.__init__'s keywords and their defaults, in signature order
EXTRAS = dict(backend="auto", l1=0.0, max_grad_norm=None, state_dtype=None, master_weights=False,
              stochastic_rounding=False, kahan_sum=False, flat=False, gradient_release=False)
_SWITCHES = ("master_weights", "stochastic_rounding", "kahan_sum", "flat", "gradient_release")
# the low-precision options that keep bfloat16/float16 params honest, each its own way:
# at most one of them per param group
_EXCLUSIVE = {("master_weights", "stochastic_rounding"): "with a float32 master copy the "
              "param is only a rounded view of it",
              ("kahan_sum", "master_weights"): "both carry what the param's rounding loses "
              "(a compensation in the param's dtype, or a float32 copy)",
              ("kahan_sum", "stochastic_rounding"): "the compensation carries what rounding to "
              "nearest loses; random rounding would feed it noise"}

# gradient release (release.py) steps each bucket of params from its gradient's hook and
# frees the gradient: what needs every gradient first has none to read
SCALER_REFUSAL = (
    "gradient_release=True does not take torch.amp.GradScaler: each bucket of params was "
    "stepped (with the scaled gradients) during the backward, before the scaler could check "
    "every gradient for infs; train without a GradScaler (bfloat16 autocast needs none) or "
    "build the optimizer without gradient_release")


def _number(name, v):
    # bool is an int to Python, but l1=True is a slip, not a coefficient
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(v).__name__}: {v!r}")


def validate(cls_name, refuses, *, backend, l1, max_grad_norm, state_dtype, **switches):
    """Raise TypeError (wrong type) or ValueError (wrong value) naming the keyword; ``refuses``
    are the options the class lacks (a value that turns one on is a ValueError)."""
    if not isinstance(backend, str) or backend not in ("auto", "numba", "triton"):
        raise ValueError(f"backend must be 'auto', 'numba' or 'triton', got {backend!r}")
    _number("l1", l1)
    if not 0.0 <= l1:
        raise ValueError(f"Invalid l1 value: {l1}")
    if max_grad_norm is not None:  # None: no clipping
        _number("max_grad_norm", max_grad_norm)
        if not 0.0 <= max_grad_norm:
            raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm}")
    if state_dtype is not None and not isinstance(state_dtype, torch.dtype):
        raise TypeError(f"state_dtype must be None (the param's dtype) or a torch.dtype, got "
                        f"{type(state_dtype).__name__}: {state_dtype!r}")
    if state_dtype not in (None, torch.float32, torch.uint8, torch.uint4):
        raise ValueError(f"state_dtype must be None (the param's dtype), torch.float32, "
                         f"torch.uint8 (8-bit state) or torch.uint4 (4-bit state), got "
                         f"{state_dtype}")
    mw = switches["master_weights"]
    if not isinstance(mw, (bool, str)):
        raise TypeError(f"master_weights must be True, False or 'remainder', got "
                        f"{type(mw).__name__}: {mw!r}")
    if isinstance(mw, str) and mw != "remainder":
        raise ValueError(f"master_weights must be True, False or 'remainder', got {mw!r}")
    for k in _SWITCHES[1:]:
        if not isinstance(switches[k], bool):
            raise TypeError(f"{k} must be True or False, got {type(switches[k]).__name__}: "
                            f"{switches[k]!r}")
    for k, v in (("l1", l1), ("master_weights", switches["master_weights"]),
                 ("state_dtype", state_dtype),
                 ("stochastic_rounding", switches["stochastic_rounding"]),
                 ("kahan_sum", switches["kahan_sum"]),
                 ("gradient_release", switches["gradient_release"])):
        if v and k in refuses:
            raise ValueError(f"fusedopt.{cls_name} does not support {k}")
    exclusive(switches)
    if switches["gradient_release"] and max_grad_norm is not None:
        raise ValueError("gradient_release and max_grad_norm exclude each other: clipping by "
                         "the global norm needs every gradient before the first param is "
                         "stepped, and gradient release steps (and frees) them during the "
                         "backward")
    if switches["gradient_release"] and switches["flat"]:
        raise ValueError("gradient_release and flat exclude each other: flat=True keeps every "
                         "gradient in one buffer of the plan's, which gradient release would "
                         "have to free bucket by bucket")


REMAINDER_FP16 = (
    "master_weights='remainder' takes bfloat16 params (float32 and float64 ones are their "
    "own masters): a float16 param is not the upper half of its float32 master, so no "
    "16-bit remainder completes it; use master_weights=True for float16 params")


def exclusive(group):
    """Raise ValueError naming both options where ``group`` (a param group, or the
    constructor's keywords) turns on two of master_weights, stochastic_rounding and
    kahan_sum, or naming master_weights where it is "remainder" for a float16 param."""
    for (a, b), why in _EXCLUSIVE.items():
        if group.get(a) and group.get(b):
            raise ValueError(f"{a} and {b} exclude each other: {why}")
    params = group.get("params", ())
    params = [params] if torch.is_tensor(params) else params
    if group.get("master_weights") == "remainder" and isinstance(params, (list, tuple)) \
            and any(torch.is_tensor(p) and p.dtype == torch.float16 for p in params):
        raise ValueError(REMAINDER_FP16)


def signature_with(torch_cls):
    """torch_cls's constructor signature plus fusedopt's keyword-only extras."""
    sig = inspect.signature(torch_cls.__init__)
    params = list(sig.parameters.values())[1:]
    # before a **kwargs (pytorch_optimizer's constructors end with one), which stays last
    rest = [p for p in params if p.kind == p.VAR_KEYWORD]
    # (an extra the twin has an argument of its own for, LAMB's max_grad_norm, is the twin's)
    own = {p.name for p in params}
    params = [p for p in params if p.kind != p.VAR_KEYWORD] + [
        inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v)
        for k, v in EXTRAS.items() if k not in own] + rest
    return sig.replace(parameters=params)
