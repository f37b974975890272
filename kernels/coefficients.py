"""The engines' row of coefficients, and the one place that fills it.

A rule's coefficients are its keyword-only parameters (rules.py): an optimizer class hands
them over by name, ``{"step_size": ..., "eps": ...}``, and ``pack`` lays them out as the
engines read them: a row of NCOEF values, the rule's own in the order of its signature
from slot 0, then the slots the engines own (ENGINE), which no rule's can reach:

- ``grad_scale``: the gradient's factor (GradScaler's 1 / scale, a clipping factor), read
  under the SCALE_GRAD flag;
- ``lerp_w``, ``lerp_w_rest``, ``lerp_count``: the matrix kernel's row factors (flag
  ROW_LERP): torch's lerp weight, 1 - it, and the count a row's sum is divided by;
- ``maximize``: nonzero where the gradient is negated before the rule (torch's
  ``maximize``).  A value, not a flag: groups that differ in it run one compiled variant
  (a flag doubled the variants a model with both signs compiles, and the parity matrix's).

The engines call a rule through ``adapter``: a function generated from its signature that
takes the engine's fixed shape (p, g, three state slots, the row as a tuple) and passes
the rule exactly its own state slots and coefficients, positionally (``positional``).
"""
import functools
import inspect
import linecache
import types

from . import rules

ENGINE = ("grad_scale", "lerp_w", "lerp_w_rest", "lerp_count", "maximize")
NCOEF = 17
OWN = NCOEF - len(ENGINE)  # the most coefficients a rule may have: slots 0..OWN-1
SLOT = {name: OWN + i for i, name in enumerate(ENGINE)}
SLOTS = {name.upper(): i for name, i in SLOT.items()}  # the kernels' names for them
GRAD_SCALE, LERP_W, LERP_W_REST, LERP_COUNT, MAXIMIZE = SLOTS.values()  # (names to import)
STATE = 3  # state slots the engines carry (a, b, c)


@functools.cache
def signature(rule):
    """(state slot names, coefficient names) of ``rule``: its positional parameters after
    p and g, and its keyword-only ones, in order."""
    params = inspect.signature(rules.RULES[rule]).parameters.values()
    state = tuple(p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD)[2:]
    names = tuple(p.name for p in params if p.kind == p.KEYWORD_ONLY)
    if len(state) > STATE or len(names) > OWN or set(names) & set(ENGINE) \
            or any(p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                   or p.default is not p.empty for p in params):
        raise TypeError(f"rule {rule!r}: at most {STATE} state slots and {OWN} keyword-only "
                        f"coefficients, none named as the engines' {ENGINE}, no defaults")
    return state, names


_ORDER = {}  # rule -> its coefficient names, in row order
_PAD = [(0.0,) * (NCOEF - n) for n in range(NCOEF + 1)]


def pack(rule, coeffs):
    """The engines' row (a tuple of NCOEF floats or tensors) from ``coeffs``, a mapping of
    every coefficient name of ``rule`` and any of the engines' (ENGINE) to its value; an
    engine slot not given is 0.  An unknown or missing name is a TypeError."""
    names = _ORDER.get(rule)
    if names is None:
        names = _ORDER[rule] = signature(rule)[1]
    try:
        row = (*map(coeffs.__getitem__, names), *_PAD[len(names)])
    except KeyError:
        row = None
    if row is not None:
        if len(coeffs) == len(names):  # (every step: the rule's names alone)
            return row
        given = [(SLOT[k], coeffs[k]) for k in ENGINE if k in coeffs]
        if len(given) == len(coeffs) - len(names):
            row = list(row)
            for j, v in given:
                row[j] = v
            return tuple(row)
    unknown = [k for k in coeffs if k not in names and k not in SLOT]
    missing = [k for k in names if k not in coeffs]
    raise TypeError(f"rule {rule!r}: " + "; ".join(
        [f"unknown coefficient(s) {unknown}"] * bool(unknown)
        + [f"missing coefficient(s) {missing}"] * bool(missing))
        + f" (its coefficients: {list(names)}; the engines': {list(ENGINE)})")

def positional(fn):
    """``fn`` with its keyword-only parameters made positional (same code otherwise): the
    engines pass the row in order, and numba's inliner cannot bind keyword arguments."""
    co = fn.__code__
    co = co.replace(co_argcount=co.co_argcount + co.co_kwonlyargcount, co_kwonlyargcount=0)
    return types.FunctionType(co, fn.__globals__, fn.__name__)


def adapter(rule):
    """``call(p, g, a, b, c, row) -> (p, a, b, c)``, calling ``rule`` (a global of the
    function's copy) with its own state slots and the row's slots of its coefficients,
    the gradient negated first where the row's ``maximize`` slot is nonzero (a select:
    exactly torch's ``-grad``, NaN's sign included).
    Generated (a loop or a star call would not compile in numba's inliner); its source
    is registered with linecache, where Triton reads a function's source."""
    state, names = signature(rule)
    slots = ", ".join("abc"[:len(state)])
    out = f"p, {slots}" if state else "p"
    args = ", ".join(["p", "g", *"abc"[:len(state)], *(f"row[{i}]" for i in range(len(names)))])
    src = (f"def call(p, g, a, b, c, row):\n"
           f"    g = ops.where(row[{SLOT['maximize']}] != 0, -g, g)\n"
           f"    {out} = {rule}({args})\n    return p, a, b, c\n")
    name = f"<fusedopt.kernels.coefficients adapter of {rule}>"
    linecache.cache[name] = (len(src), None, src.splitlines(True), name)
    ns = {}
    exec(compile(src, name, "exec"), ns)
    return ns["call"]


for _rule in rules.RULES:  # a rule that does not fit the row fails at import
    signature(_rule)
