"""The tiers are sound (tests/tiers.py): `--full` collects what the suite collects without
the tier machinery, the quick tier is a subset that every test file contributes to, every
registered optimizer runs its parity case on both engines, both engines stay wherever a test
takes one, and every rule names a function that exists, with a reason."""
import collections
import os
import re
import subprocess
import sys

import pytest
import torch

import tiers
from fusedopt import parity

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def _collect(*args):
    # a child pytest, so that this run's own options (-k, -n, a file) do not change the answer
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          *args, TESTS], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    ids = [line for line in out.stdout.splitlines() if "::" in line]
    m = re.search(r"^(?:(\d+)/)?(\d+) tests? collected", out.stdout, re.M)
    return ids, int(m.group(2))  # the count before the quick tier deselects


# one xdist group (the README's --dist loadgroup): `collected` runs on one worker
pytestmark = pytest.mark.xdist_group("tiers")


@pytest.fixture(scope="module")
def collected():
    quick, before = _collect()
    full, full_count = _collect("--full")
    return quick, before, full, full_count


def test_full_is_everything_and_quick_a_subset(collected):
    quick, before, full, full_count = collected
    assert len(full) == full_count == before  # --full deselects nothing the suite collects
    assert len(set(full)) == len(full)
    assert set(quick) <= set(full) and len(quick) < len(full)


def test_every_file_and_unlisted_function_is_in_the_quick_tier(collected):
    quick, _, full, _ = collected
    files = lambda ids: {i.split("::")[0] for i in ids}
    assert files(full) - files(quick) == set()
    functions = {tiers.function_key(i) for i in quick}
    missing = {tiers.function_key(i) for i in full} - functions - set(tiers.RULES)
    assert missing == set()  # a function tiers.py does not name runs whole


def test_every_optimizer_runs_its_first_parity_case_on_both_engines(collected):
    quick = set(collected[0])
    first = {}
    for name, case, dtype in parity.matrix():
        if dtype == torch.float32:
            first.setdefault(name, f"tests/test_parity.py::test_parity[{name}[{parity.case_id(case)}]-float32]")
    from fusedopt import spec
    assert set(first) == set(spec.names())
    # test_parity runs both engines on each optimizer's first float32 case (Adafactor's too)
    assert sorted(set(first.values()) - quick) == []


def _engines(ids):
    out = collections.defaultdict(set)
    for i in ids:
        for engine in ("numba", "triton"):
            if re.search(rf"[\[-]{engine}[\]-]", i):
                out[tiers.function_key(i)].add(engine)
    return out


def test_both_engines_stay_wherever_a_test_takes_one(collected):
    quick, _, full, _ = collected
    q = _engines(quick)
    for key, engines in _engines(full).items():
        if tiers.RULES.get(key, tiers.rule("")).cover is not None:
            assert q[key] == engines, key


def test_every_rule_names_a_function_and_says_why(collected):
    functions = {tiers.function_key(i) for i in collected[2]}
    for key, rule in tiers.RULES.items():
        assert key in functions, f"tests/tiers.py names {key}, which is not collected"
        assert len(rule.why) > 10, key
        assert set(rule.cover or ()) | set(rule.prefer) <= _arguments(key), key


def _arguments(key):
    # the parametrized arguments of a test function, read from its module
    import importlib
    module, function = key.split("::")
    fn = getattr(importlib.import_module(module[:-3]), function)
    return {a.strip() for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"
            for a in (m.args[0].split(",") if isinstance(m.args[0], str) else m.args[0])}
