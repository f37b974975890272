"""One declaration per algorithm: what every layer outside its class needs to know of it.

Each optimizer class declares ``spec = Spec(...)`` beside its code; defining the class
registers it (``FusedOptimizer.__init_subclass__``), and the float64 reference, the parity
harness, the 8-bit state's sign choice, the benchmark, the tests' tables and the README's
optimizer table read the registry instead of keeping lists of their own.  This module
imports nothing of the package, so any layer may read it.
"""
from dataclasses import dataclass, field
from typing import Callable

REGISTRY = {}  # class name -> class, in the order the classes were defined


@dataclass(frozen=True)
class Spec:
    """The facts of one algorithm that live outside its update rule.

    reference: the float64 step ``fn(p, g, state, **hyperparameters)`` the parity tests
        measure both engines against (state: a dict of float64 tensors it creates).
    source: the implementation the class is a twin of, as users know it
        (``"torch.optim.Adam"``, ``"lion-pytorch"``): its arithmetic is what parity pins.
    cases: parity's algorithm-specific flag sets; each also crosses maximize x weight_decay.
    group_hp: four param groups' hyperparameters for parity (each group its own).
    test_hp: one flag-rich hyperparameter set for the tests that run every algorithm.
    program_hp: the random programs' hyperparameters (tests/programs.py).
    unsigned: state slots that are never negative (8-bit state keeps them on the
        unsigned map: twice the resolution).
    bench_hp, traffic: the benchmark's constructor kwargs, and the float32 tensors it
        reads and writes per param (the memory roof streams as many bytes): (reads,
        writes), or one such pair per pass of a step of several passes (Spec.trust's
        reduce pass reads alone: ((4, 0), (4, 3))).
    shapes: parity's params per group, where the default shapes do not suit.
    weight_decay: whether the algorithm has a weight_decay argument.
    fp16_eps: parity raises eps to 1e-4 in float16 (eps below float16's range).
    torch_fused: torch has a fused kernel for it (the benchmark's fused row).
    aot: the flags and state-slot mask of the variant the AOT PTX test compiles (one
        per rule: a class that shares its parent's rule declares none).
    ulp: parity's bound on the distance to torch's result where the default does not
        hold, in ulp of the param or of the update (fusedopt/parity.py), which then also
        bounds the engines' distance to each other.
    factored: the state of a matrix param is factored into row and column statistics
        (Adafactor): the plan steps such params through the matrix kernel.
    complex_params: the twin steps complex params (as a real view); False: the plan leaves
        them to the twin, which raises its own error for them, in its order of params.
    trust: the update is scaled per tensor by factors made from per-tensor sums (LAMB's
        and LARS's trust ratios, StableAdamW's RMS): before each update, a reduce pass of
        the rule (flag REDUCE: the same loads and math, nothing stored) sums the products
        of its outputs per tensor (bucket.reduce), and the class's ``_trust`` makes them
        coefficients of one value per tensor.
    train_mode: the class steps only in train mode, as its source (schedule-free: a new
        optimizer raises at step until ``train()`` is called); harnesses call ``ready``.
    stacked: the update of each (2-D) param is a matrix function computed on same-shape
        stacks between two engine passes (Muon: fusedopt/stacked.py); the plan gives each
        bucket its stacks and leaves params of other than 2 dims to the twin (its errors).
        The class then steps its buckets with ``_stacked_step``.  Such an algorithm takes
        2-D params alone: the shared tests of any-shaped params leave it to its own tests.
    maximize: whether the algorithm has a maximize argument (parity crosses it).
    ulp_dtype: the dtype whose ulp (of the param's or the update's magnitude) is the unit
        of ``ulp``, where the update passes through a coarser dtype than the param's
        (Muon: bfloat16 matmuls, whose batched and per-matrix results may differ by an
        ulp of theirs); None: the param's dtype.
    """
    reference: Callable
    source: str
    cases: tuple = ({},)
    group_hp: tuple = ()
    test_hp: dict = field(default_factory=dict)
    program_hp: dict = field(default_factory=dict)
    unsigned: frozenset = frozenset()
    bench_hp: dict = field(default_factory=dict)
    traffic: tuple = (3, 2)
    shapes: tuple = ()
    weight_decay: bool = True
    fp16_eps: bool = False
    torch_fused: bool = False
    aot: tuple = None
    ulp: int = None
    factored: bool = False
    complex_params: bool = True
    train_mode: bool = False
    trust: bool = False
    stacked: bool = False
    maximize: bool = True
    ulp_dtype: object = None


def register(cls):
    """Record ``cls`` (a class that declares ``spec`` in its own body)."""
    if cls.__name__ in REGISTRY and REGISTRY[cls.__name__] is not cls:
        raise ValueError(f"two optimizer classes named {cls.__name__}")
    REGISTRY[cls.__name__] = cls


def ready(opt):
    """``opt`` (a registered class, its twin or its source's class), put in train mode
    where the algorithm steps only there (Spec.train_mode); any other optimizer as it is."""
    where = f"{type(opt).__module__.partition('.')[0]}.{type(opt).__name__}"
    if any(cls.spec.train_mode and (isinstance(opt, (cls, cls.twin())) or where == cls.spec.source)
           for cls in REGISTRY.values()):
        opt.train()
    return opt


def names():
    """The registered algorithms' class names, in the order they were defined."""
    return list(REGISTRY)


def unsigned_slots():
    """The state slots any registered algorithm declares never negative."""
    return frozenset().union(*(cls.spec.unsigned for cls in REGISTRY.values()))


def spec(name):
    """The spec of the class named ``name``; a KeyError naming the known ones otherwise."""
    try:
        return REGISTRY[name].spec
    except KeyError:
        raise KeyError(f"no optimizer named {name!r}; known: {', '.join(REGISTRY)}") from None


def offers_8bit(cls):
    """Whether optimizer class ``cls`` takes ``state_dtype=torch.uint8`` (8-bit state): not
    where it refuses ``state_dtype``, nor a trust algorithm (Spec.trust), whose reduce pass
    reads float state."""
    return "state_dtype" not in getattr(cls, "_refuses", ()) and not cls.spec.trust


def offers_4bit(cls):
    """Whether optimizer class ``cls`` takes ``state_dtype=torch.uint4`` (4-bit state): the
    classes that take 8-bit state (``offers_8bit``), whose coded slots the same kernels hold
    as 4-bit codes."""
    return offers_8bit(cls)


def table():
    """The README's optimizer table (markdown), one row per registered class
    (``python -c "import fusedopt; print(fusedopt.spec.table())"``; tests/test_spec.py
    checks the README holds it)."""
    rows = ["| optimizer | twin (checked against) | torch fused | 8-bit / 4-bit state "
            "| masters / SR / Kahan |",
            "|---|---|---|---|---|"]
    yes = {True: "yes", False: "no"}
    for name, cls in REGISTRY.items():
        refuses = set(getattr(cls, "_refuses", ()))
        eight, four = offers_8bit(cls), offers_4bit(cls)
        rows.append(f"| `{name}` | `{cls.spec.source}` | {yes[cls.spec.torch_fused]} "
                    f"| {yes[eight]} / {yes[four]} "
                    f"| {yes['master_weights' not in refuses]} / "
                    f"{yes['stochastic_rounding' not in refuses]} / "
                    f"{yes['kahan_sum' not in refuses]} |")
    return "\n".join(rows)

