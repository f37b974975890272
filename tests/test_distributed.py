"""DDP, FSDP2 (DTensor params) and torch.distributed.checkpoint on CPU with gloo: each
scenario of dist_workers.py runs in fresh processes, every rank asserting on its own."""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
HELPERS = os.path.join(HERE, "helpers")


def scenario(name, world, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(HELPERS, "dist_workers.py"), name,
                           str(world), str(out)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.mark.parametrize("name", ["ddp", "fsdp", "ddp_flat", "fsdp_flat", "fsdp_adafactor"])
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


def test_trust_ratios_under_fsdp2(tmp_path):
    """LAMB (its global max_grad_norm clipping acting), LARS and StableAdamW on FSDP2
    shards (uneven), fused (each shard's sums all-reduced), step the params the unsharded
    single-process step does (dist_trust.py)."""
    scenario("dist_trust:sharded", 2, tmp_path)


def test_trust_ratios_from_the_shards_norms_are_caught(tmp_path):
    """The mutation: trust ratios from each shard's own norms (the sums not all-reduced)
    fail the comparison, for each algorithm."""
    scenario("dist_trust:local", 2, tmp_path)


@pytest.fixture(scope="module")
def checkpoint_8bit(tmp_path_factory):
    """fsdp_8bit's run (2 ranks): its DCP checkpoint and expected continuation."""
    out = tmp_path_factory.mktemp("fsdp_8bit")
    scenario("fsdp_8bit", 2, out)
    return out


# one xdist group (the README's --dist loadgroup): the module fixture runs on one worker
@pytest.mark.xdist_group("checkpoint_8bit")
def test_8bit_state_under_fsdp2(checkpoint_8bit):
    """8-bit AdamW on FSDP2: DTensor codes and absmax laid like their params, <= 2.2 bytes
    of state per param per shard, the loss within 2 % of one process's 8-bit run, a DCP
    save continued bit for bit by fresh objects (asserted inside the scenario)."""


@pytest.mark.xdist_group("checkpoint_8bit")
@pytest.mark.parametrize("world", [1, 3])
def test_8bit_checkpoint_reshard(checkpoint_8bit, world):
    """The 2-rank 8-bit checkpoint into 1 (and 3) ranks: codes and absmax resharded bit
    for bit (no re-quantization), the continuation within 3e-4 of the saved run's params."""
    scenario("dcp_load_8bit", world, checkpoint_8bit)
