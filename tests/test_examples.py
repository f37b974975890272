"""The example training script runs (AMP, scheduler, compiled step, checkpoint/resume):
it exits non-zero if the resumed run differs from the uninterrupted one or the loss
does not fall."""
import os
import subprocess
import sys

import pytest

EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "train.py")


@pytest.mark.parametrize("optim", ["AdamW", "SGD"])
def test_example_trains_and_resumes(optim):
    proc = subprocess.run([sys.executable, EXAMPLE, "--steps", "30", "--optim", optim],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "resumed run identical: True" in proc.stdout
