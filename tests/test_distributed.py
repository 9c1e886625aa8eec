"""DDP and FSDP2 under torchrun (gloo, 2 CPU processes) give the update of one large batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import ListSource, config, flat_params, lm_data, tiny_model

from lmforge.train.loop import Trainer
from lmforge.train.losses import causal_lm_loss

HERE = Path(__file__).parent


def torchrun(strategy: str, out: Path, steps: int, *extra: str) -> torch.Tensor:
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "dist_worker.py"), strategy, str(out), str(steps), *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out / "params.pt", weights_only=True)


def single_process(steps: int, out: Path) -> torch.Tensor:
    model = tiny_model()
    Trainer(model, config(steps=steps, micro_batch_size=8, lr=1e-3), ListSource(lm_data(), 8), causal_lm_loss,
            out).run()
    return flat_params(model)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_large_batch(strategy, tmp_path):
    expected = single_process(3, tmp_path / "single")
    got = torchrun(strategy, tmp_path / strategy, 3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_fsdp_checkpoint_resumes(tmp_path):
    torchrun("fsdp", tmp_path / "run", 2)  # writes step-000002
    got = torchrun("fsdp", tmp_path / "run", 4, "--resume")
    torch.testing.assert_close(got, single_process(4, tmp_path / "single"), atol=1e-5, rtol=0)
