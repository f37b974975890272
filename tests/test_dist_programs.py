"""Random distributed programs (tests/dist_programs.py): FSDP2 and DDP on 2 gloo ranks,
fusedopt against its torch.optim twin on the same sharding, in one process group."""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
HELPERS = os.path.join(HERE, "helpers")
COUNT = 50


def programs(first, count, *flags):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(HELPERS, "dist_programs.py"), str(first),
                           str(count), *flags], capture_output=True, text=True, env=env,
                          timeout=900)


def test_random_distributed_programs():
    out = programs(0, COUNT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-6000:]
    assert len(out.stdout.splitlines()) == COUNT, out.stdout[-2000:]


def test_programs_fail_without_the_norms_all_reduce():
    """The mutation check: with fusedopt.clip's all-reduce of the shards' partial norms
    skipped, each rank clips by its own shards' norm, and the programs must see it (the
    first FSDP2 program with a clip or max_grad_norm)."""
    out = programs(0, 10, "--no-reduce")
    assert out.returncode != 0, out.stdout[-2000:]
    # a disagreement the programs found (the same seeds pass with the all-reduce: above),
    # not a crash
    assert "AssertionError: program " in out.stderr or "AssertionError: ('program " in out.stderr, \
        out.stderr[-6000:]
