"""The per-algorithm registry (fusedopt/spec.py): every class declares a complete spec, the
layers that list algorithms read it, and the README's optimizer table is generated from it."""
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
