"""DDP, FSDP2 (DTensor params) and torch.distributed.checkpoint on CPU with gloo: each
scenario of dist_workers.py runs in fresh processes, every rank asserting on its own."""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def scenario(name, world, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "dist_workers.py"), name,
                           str(world), str(out)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.mark.parametrize("name", ["ddp", "fsdp", "ddp_flat", "fsdp_flat"])
def test_matches_torch_optim(name, tmp_path):
    scenario(name, 2, tmp_path)


def test_checkpoint_resume_and_reshard(tmp_path):
    """Save with 2 ranks; load into a fresh process group of 2, then of 1 rank (DCP
    reshards the DTensor state): both continue as the uninterrupted run did."""
    scenario("dcp_save", 2, tmp_path)
    scenario("dcp_load", 2, tmp_path)
    scenario("dcp_load", 1, tmp_path)


@pytest.mark.parametrize("world", [2, 3])
def test_clipping_by_the_global_norm(world, tmp_path):
    """clip_grad_norm_ and max_grad_norm on FSDP2 shards equal torch's on the same sharding,
    also over two meshes (dist_clip.py)."""
    scenario("dist_clip:every", world, tmp_path)


def test_clipping_without_the_all_reduce_fails(tmp_path):
    """The mutation: each rank clipping by its own shards' norm is caught."""
    with pytest.raises(AssertionError, match="grad_norm step 0"):
        scenario("dist_clip:no_reduce", 2, tmp_path)
