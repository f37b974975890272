"""The per-algorithm registry (fusedopt/spec.py): every class declares a complete spec, the
layers that list algorithms read it, and the README's optimizer table is generated from it."""
import inspect
import pathlib

import pytest
import torch

import fusedopt
from fusedopt import benchmark, parity, quant, reference, spec
from fusedopt.optimizer import FusedOptimizer

# (the optimizer classes: not MuonWithAuxAdam, which holds two of them)
CLASSES = [n for n in fusedopt.__all__ if isinstance(getattr(fusedopt, n), type)
           and issubclass(getattr(fusedopt, n), FusedOptimizer)]


def test_every_class_is_registered_with_a_complete_spec():
    assert sorted(spec.names()) == sorted(CLASSES)
    for name in CLASSES:
        s = spec.spec(name)
        assert callable(s.reference) and s.source
        assert len(s.group_hp) == 4, name  # parity's four param groups
        assert s.cases and all(isinstance(c, dict) for c in s.cases)
        assert "lr" in s.test_hp and "lr" in s.program_hp and "lr" in s.bench_hp
        # a class that shares its parent's rule may leave the AOT variant to the parent
        assert s.aot or any(c._rule == getattr(fusedopt, name)._rule and spec.spec(n).aot
                            for n, c in spec.REGISTRY.items()), name


def test_the_layers_read_the_registry():
    assert set(benchmark.OPTIMS) >= {n.lower() for n in CLASSES}
    assert {n for n, _, _ in parity.matrix()} == set(CLASSES)
    assert reference.algorithm("adamw") is fusedopt.AdamW.spec.reference
    assert not quant.signed("exp_avg_sq") and quant.signed("exp_avg")
    with pytest.raises(KeyError, match="no optimizer named 'nope'"):
        spec.spec("nope")


def test_defining_a_class_registers_it():
    """Adding an algorithm is declaring it: the new class appears in every list at once."""
    def ref(p, g, st, lr=0.1, **hp):
        p.sub_(lr * g)

    try:
        class PlainSGD(FusedOptimizer, torch.optim.SGD):
            _rule, _has_step = "sgd", False
            spec = spec.Spec(reference=ref, source="torch.optim.SGD",
                             group_hp=(dict(lr=0.1),) * 4, unsigned=frozenset({"plain_sq"}))

        assert spec.REGISTRY["PlainSGD"] is PlainSGD
        assert "PlainSGD" in spec.names() and not quant.signed("plain_sq")
        assert reference.algorithm("plainsgd") is ref
        with pytest.raises(ValueError, match="two optimizer classes named PlainSGD"):
            class PlainSGD(FusedOptimizer, torch.optim.SGD):  # noqa: F811
                spec = spec.Spec(reference=ref, source="x")
    finally:
        spec.REGISTRY.pop("PlainSGD", None)


def test_readme_table_is_the_registry():
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    begin, end = "<!-- optimizers:begin -->\n", "\n<!-- optimizers:end -->"
    assert begin in text and end in text, "the README lost its optimizer table's markers"
    got = text[text.index(begin) + len(begin):text.index(end)]
    assert got == spec.table(), "regenerate the table:\n" + spec.table()


# issue 33's bound on the newer algorithms: the class plus its rule(s) in kernels/rules.py
# within 80 lines, counted as inspect.getsourcelines does (the class line to its body's
# last line, docstring and spec included; each rule's def to its last line). Machinery
# several classes share is not theirs (FusedOptimizer; trust.TrustOptimizer for the three
# trust-ratio classes), nor Muon's Newton-Schulz helper. (Schedule-free's two classes share
# a base of their own in schedulefree.py, counted with them in the issue: not listed here.)
SIZED = {"LAMB": ("lamb",), "LARS": ("lars",), "StableAdamW": ("stableadamw",),
         "AdEMAMix": ("ademamix",), "Muon": ("muon_momentum", "muon_update")}


@pytest.mark.parametrize("name", SIZED)
def test_class_and_rule_within_80_lines(name):
    from fusedopt.kernels import rules
    cls = getattr(fusedopt, name)
    assert cls._rule in SIZED[name]
    lines = len(inspect.getsourcelines(cls)[0]) + sum(
        len(inspect.getsourcelines(rules.RULES[r])[0]) for r in SIZED[name])
    assert lines <= 80, f"{name}: its class and rule are {lines} lines"
