"""Journey 13, the user's data: a corpus that lives on the Hub (laid out offline in a Hub cache) →
`lmforge tokenizer train --input hf:...` → `lmforge pretrain` streaming it (no token files), SIGKILLed and
resumed, ending identical to an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from hub_cache import cache_repo
from lmforge.cli import main
from lmforge.tokenizer import train_tokenizer
from lmforge.train.run_dir import STATE_FILE, RunDir
from lmforge.world.documents import pretraining_corpus
from lmforge.world.people import make_world

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
REVISION = hashlib.sha1(b"corpus").hexdigest()
SMALL = ["model.overrides.hidden_size=32", "model.overrides.intermediate_size=64", "model.overrides.num_hidden_layers=2",
         "model.overrides.max_position_embeddings=64", "data.seq_len=32", "data.eval_batches=2",
         "train.steps=12", "train.micro_batch_size=4", "train.grad_accum=2", "train.warmup_steps=2",
         "train.log_every=2", "train.eval_every=4", "train.save_every=2", "train.keep_last=20"]


@pytest.fixture
def hub(tmp_path, monkeypatch) -> tuple[Path, list[str]]:
    """A corpus dataset `org/bios` (its text in a `content` column) in an offline Hub cache; its documents."""
    docs = pretraining_corpus(make_world(0, n_people=20, n_companies=4), variants=2)
    folder = tmp_path / "bios"
    (folder / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"content": d} for d in docs]), folder / "data" / "train-00000-of-00001.parquet")
    cache = tmp_path / "hub-cache"
    cache_repo(cache, "org/bios", folder, REVISION, repo_type="dataset")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    return cache, docs


def pretrain(tok: Path, out: Path, *extra: str, stderr: int = subprocess.PIPE) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lmforge.cli", "pretrain", "--config", str(CONFIGS / "pretrain-tiny.yaml"),
           "data.paths=[hf:org/bios]", "data.text_column=content", "data.streaming=true", f"data.tokenizer={tok}",
           f"out_dir={out}", *SMALL, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def finish(process: subprocess.Popen) -> str:
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    return stderr


@pytest.mark.slow
def test_a_hub_corpus_streamed_is_killed_and_resumes_to_the_same_model(hub, tmp_path):
    _, docs = hub
    tok = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", "hf:org/bios", "--text-column", "content", "--vocab-size", "300",
                 "--out", str(tok)]) == 0
    local = tmp_path / "bios.jsonl"
    local.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    same = train_tokenizer([local], 300, tmp_path / "tok-local", show_progress=False)
    assert (tok / "tokenizer.json").read_text() == (tmp_path / "tok-local" / "tokenizer.json").read_text()
    assert same.vocab_size == 300

    straight = tmp_path / "straight"
    finish(pretrain(tok, straight))
    assert not (straight / "data").exists()  # streamed: no token files
    records = RunDir(straight).records()
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8, 12]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]

    killed = tmp_path / "killed"
    run = pretrain(tok, killed, stderr=subprocess.DEVNULL)  # unread: a full pipe would stall it
    deadline = time.monotonic() + 300
    while not RunDir(killed).checkpoints() and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert run.returncode == -signal.SIGKILL
    assert RunDir(killed).checkpoints()[-1].name != "step-000012"  # it died before the end
    finish(pretrain(tok, killed, "--resume"))

    a, b = (load_file(run_dir / "model" / "model.safetensors") for run_dir in (straight, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (torch.load(RunDir(d).checkpoints()[-1] / STATE_FILE, weights_only=True)["data"] for d in (straight, killed))
    assert {k: v for k, v in sa.items() if k != "buffer"} == {k: v for k, v in sb.items() if k != "buffer"}
    assert torch.equal(sa["buffer"], sb["buffer"]) and sa["read"] > 0
    losses = [[(r["step"], r.get("loss"), r.get("val_loss")) for r in RunDir(d).records()] for d in (straight, killed)]
    assert losses[0] == losses[1]
