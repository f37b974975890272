"""The user-facing tools: `fusedopt parity`, `fusedopt bench` (and their exit codes and files)."""
import json
import pathlib
import runpy
import subprocess
import sys

import torch

import fusedopt
from fusedopt.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_model():
    """Used through `--model test_cli:tiny_model`."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 1))


class BrokenAdam(fusedopt.Adam):
    """Adam whose update is off by a little: parity must catch it."""

    def step(self, closure=None):
        super().step(closure)
        with torch.no_grad():
            for g in self.param_groups:
                for p in g["params"]:
                    p.add_(1e-4)


def test_parity_tiny_config_passes_and_prints_table(capsys, tmp_path):
    out = tmp_path / "parity.json"
    rc = main(["parity", "--optim", "adam,sgd", "--dtypes", "float32", "--steps", "3", "--quick",
               "--model", "test_cli:tiny_model", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "err vs f64" in text and "2/2 cases pass" in text
    # after the summary: the versions against the tested ranges, torch's ops, and (both
    # engines on CPU) Triton's interpreter's ops: which side is off, if any
    tail = text.split("2/2 cases pass")[1]
    assert "within the tested ranges" in tail and "torch's" in tail and "interpreter" in tail
    data = json.loads(out.read_text())
    assert len(data["results"]) == 2 and all(r["ok"] for r in data["results"])
    assert set(data["versions"]) == {"torch", "triton"} and "interpreter_ops_off" in data


def test_parity_fails_on_a_broken_optimizer(capsys):
    rc = main(["parity", "--optim", "adam", "--dtypes", "float32", "--steps", "3", "--quick",
               "--backends", "numba"], cls={"adam": BrokenAdam})
    text = capsys.readouterr().out
    assert rc == 1
    assert "FAIL" in text and "0/1 cases pass" in text


def test_bench_quick_json_and_plot(tmp_path):
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    rc = main(["bench", "--quick", "--optim", "adam,rmsprop", "--sizes", "300x7,100,5",
               "--json", str(js), "--plot", str(png)])
    assert rc == 0
    data = json.loads(js.read_text())
    assert {"device", "torch", "date"} <= set(data["machine"])
    impls = {r["impl"] for r in data["rows"]}
    assert {"roof", "torch-forloop", "torch-foreach", "torch-fused", "fusedopt"} <= impls
    for r in data["rows"]:
        for field in ("ms", "gparams_per_s", "gb_per_s", "pct_of_roof", "speedup_vs_best_torch",
                      "speedup_vs_torch-forloop", "speedup_vs_torch-foreach", "tensors", "params"):
            assert field in r and r[field] == r[field] and r[field] >= 0, (field, r)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "fusedopt", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "parity" in out.stdout and "check" in out.stdout


def test_step_split_accounts_for_the_step(capsys):
    """bench/step_split.py: its parts are timed inside real steps, so in every round kernel +
    address reads leave a non-negative rest of the step, and the timing wrappers are
    removed afterwards."""
    from fusedopt import bucket, plan
    before = (plan._Plan.grad_ptrs, bucket._Bucket.run)
    main = runpy.run_path(str(ROOT / "bench" / "step_split.py"), run_name="split")["main"]
    med = main(["--optim", "rmsprop", "--workload", "tiny", "--rounds", "3"])
    assert 0 < med["kernel"] and 0 < med["address reads (cold)"]
    assert med["smallest rest"] >= 0 and med["rest of the step"] < med["whole step"]
    assert (plan._Plan.grad_ptrs, bucket._Bucket.run) == before
    assert "rmsprop on tiny: 20000 tensors" in capsys.readouterr().out


def test_check_prints_each_table_once_and_notes_after_the_verdict(capsys, monkeypatch):
    """A terminal shows stdout and stderr together: each speed table appears once in the
    two, and the notes on torch's arithmetic come after the verdict.  (One parity case and
    a small workload: the real check's are sized in check_workloads.)"""
    from fusedopt import cli, parity
    full = parity.matrix
    monkeypatch.setattr(parity, "matrix", lambda optims, dtypes: full(["sgd"], [torch.float32]))
    monkeypatch.setattr(cli, "check_workloads",
                        lambda limit=cli.CHECK_MEMORY: ({"small": [(300, 7), (100,)]}, "sized"))
    assert main(["check"]) == 0
    cap = capsys.readouterr()
    both = cap.out + cap.err
    lines = [ln for ln in both.splitlines() if ln.strip()]
    head = next(ln for ln in lines if ln.startswith("optimizer") and "Gparam/s" in ln)
    assert both.count(head) == 2  # adam's table and sgd's
    rows = [ln for ln in lines if ln.split()[:2] in (["adam", "small"], ["sgd", "small"])]
    assert rows and len(rows) == len(set(rows))
    out = cap.out
    assert out.index("== verdict ==") < out.index("== notes on this machine ==")
    notes = out[out.index("== notes on this machine =="):]
    assert "sized" in notes and "check took" in notes
    from fusedopt import arith
    for line in arith.describe() or ["torch's elementary ops"]:
        assert line[:40] in notes and line[:40] not in out[:out.index("== verdict ==")]
    # SGD float32 is the case triton 3.8's interpreter failed (its fma rounds twice): the
    # verdict is the engines', the interpreter and the versions are notes
    assert "parity: PASS\n" in out and "within the tested ranges" in notes
    assert "interpreter" in notes


def test_check_workloads_fit_the_limit():
    # in a fresh process, as `fusedopt check` runs: the sizing reads the process's resident
    # memory, which a long pytest worker has grown past the limits
    code = """
from fusedopt import cli, workloads
for limit in (4e9, 2e9):
    sized, note = cli.check_workloads(limit)
    n = sum(workloads._numel(s) for s in next(iter(sized.values())))
    rss = cli._memory()[0]
    assert rss + 0.3e9 + n * cli.CHECK_BYTES_PER_PARAM <= limit, (limit, n, rss)
    assert len(next(iter(sized.values()))) == 148 and "GB" in note
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
