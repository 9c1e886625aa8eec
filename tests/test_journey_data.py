"""Journey 13, the user's data and dashboard: data that live on the Hub (dataset repositories laid out
offline in a Hub cache).
- An instruction set whose fields have other names → `lmforge sft` with a column mapping and TensorBoard
  logging → the same losses as the records written out by hand as JSONL; TensorBoard's events equal
  `metrics.jsonl`.
- A corpus → `lmforge tokenizer train --input hf:...` → `lmforge pretrain` streaming it (no token files),
  SIGKILLed and resumed, ending identical to an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
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
from test_journey_pretrain import finish, kill_after_first_checkpoint
from test_loggers import assert_tensorboard_scalars_are_the_metrics_log

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
REVISION = hashlib.sha1(b"corpus").hexdigest()
SMALL = ["model.overrides.hidden_size=32", "model.overrides.intermediate_size=64",
         "model.overrides.num_hidden_layers=2",
         "model.overrides.max_position_embeddings=64", "data.seq_len=32", "data.eval_batches=2",
         "train.steps=12", "train.micro_batch_size=4", "train.grad_accum=2", "train.warmup_steps=2",
         "train.log_every=2", "train.eval_every=4", "train.save_every=2", "train.keep_last=20"]


@pytest.fixture
def hub(tmp_path, monkeypatch) -> tuple[Path, list[str]]:
    """A corpus dataset `org/bios` (its text in a `content` column) in an offline Hub cache; its documents."""
    docs = pretraining_corpus(make_world(0, n_people=20, n_companies=4), variants=2)
    folder = tmp_path / "bios"
    (folder / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"content": d} for d in docs]),
                   folder / "data" / "train-00000-of-00001.parquet")
    cache = tmp_path / "hub-cache"
    cache_repo(cache, "org/bios", folder, REVISION, repo_type="dataset")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    return cache, docs


SUPPORT = {split: [{"question": f"What does ticket {i} say?", "response": f"Ticket {i} asks for a refund of {i} euros."}
                   for i in range(first, first + n)] for split, first, n in (("train", 0, 24), ("test", 100, 8))}


def test_sft_on_a_hub_dataset_with_a_column_mapping_logs_to_tensorboard(hub, chat_base, tmp_path):
    folder = tmp_path / "support"
    (folder / "data").mkdir(parents=True)
    for split, rows in SUPPORT.items():
        pq.write_table(pa.Table.from_pylist(rows), folder / "data" / f"{split}-00000-of-00001.parquet")
    cache_repo(hub[0], "org/support", folder, REVISION, repo_type="dataset")
    local = {split: tmp_path / f"{split}.jsonl" for split in SUPPORT}
    for split, rows in SUPPORT.items():
        local[split].write_text("".join(json.dumps({"prompt": r["question"], "completion": r["response"]}) + "\n"
                                        for r in rows))
    common = ["--config", str(CONFIGS / "sft-tiny.yaml"), f"base={chat_base}", "train.steps=6",
              "train.micro_batch_size=4", "train.log_every=1", "train.eval_every=3", "train.save_every=6",
              "data.eval_batches=2"]
    by_name, by_file = tmp_path / "by-name", tmp_path / "by-file"
    assert main(["sft", *common, f"out_dir={by_name}", "train.loggers=[jsonl,tensorboard]",
                 "data.datasets=[{path: hf:org/support, columns: {prompt: question, completion: response}}]",
                 "data.val_path=hf:org/support"]) == 0
    assert main(["sft", *common, f"out_dir={by_file}", f"data.datasets=[{{path: {local['train']}}}]",
                 f"data.val_path={local['test']}"]) == 0

    def losses(run: Path) -> list[tuple]:
        return [(r["step"], r.get("loss"), r.get("val_loss")) for r in RunDir(run).records()]

    assert losses(by_name) == losses(by_file) and [s for s, _, v in losses(by_name) if v is not None] == [3, 6]
    assert_tensorboard_scalars_are_the_metrics_log(by_name)
    assert not (by_file / "tensorboard").exists()


def pretrain(tok: Path, out: Path, *extra: str, stderr: int = subprocess.PIPE) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lmforge.cli", "pretrain", "--config", str(CONFIGS / "pretrain-tiny.yaml"),
           "data.paths=[hf:org/bios]", "data.text_column=content", "data.streaming=true", f"data.tokenizer={tok}",
           f"out_dir={out}", *SMALL, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


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
    kill_after_first_checkpoint(pretrain(tok, killed, stderr=subprocess.DEVNULL), killed, "step-000012")
    finish(pretrain(tok, killed, "--resume"))

    a, b = (load_file(run_dir / "model" / "model.safetensors") for run_dir in (straight, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (torch.load(RunDir(d).checkpoints()[-1] / STATE_FILE, weights_only=True)["data"]
              for d in (straight, killed))
    assert {k: v for k, v in sa.items() if k != "buffer"} == {k: v for k, v in sb.items() if k != "buffer"}
    assert torch.equal(sa["buffer"], sb["buffer"]) and sa["read"] > 0
    losses = [[(r["step"], r.get("loss"), r.get("val_loss")) for r in RunDir(d).records()] for d in (straight, killed)]
    assert losses[0] == losses[1]
