"""`lmforge pretrain`: config errors, re-tokenizing a changed corpus, torchrun. (A SIGKILLed run resuming to
the uninterrupted result is in test_journey_pretrain.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.cli import main
from lmforge.tokenizer import train_tokenizer
from lmforge.world.documents import write_pretraining_corpus
from lmforge.world.people import make_world

MODEL = ["model.overrides.hidden_size=32", "model.overrides.intermediate_size=64",
         "model.overrides.num_hidden_layers=2", "model.overrides.max_position_embeddings=64"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pretrain")
    corpus = write_pretraining_corpus(make_world(0, n_people=20, n_companies=4), root / "corpus.jsonl", variants=2)
    train_tokenizer([corpus], 300, root / "tok", show_progress=False)
    config = root / "recipe.yaml"
    config.write_text(
        f"out_dir: {root / 'unused'}\n"
        f"data: {{paths: [{corpus}], tokenizer: {root / 'tok'}, seq_len: 32, workers: 1, eval_batches: 2}}\n"
        "train: {steps: 12, micro_batch_size: 4, grad_accum: 2, lr: 3.0e-3, warmup_steps: 2, log_every: 2,\n"
        "        eval_every: 4, save_every: 2, keep_last: 20, peak_flops: 1.0e+12}\n"
    )
    return config


def run(recipe: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lmforge.cli", "pretrain", "--config", str(recipe), f"out_dir={out}", *MODEL, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_bad_recipes_name_the_field(recipe, tmp_path, capsys):
    assert main(["pretrain", "--config", str(recipe), f"out_dir={tmp_path}", "train.learning_rate=1"]) == 2
    assert "learning_rate" in capsys.readouterr().err
    assert main(["pretrain", "--config", str(recipe), f"out_dir={tmp_path}", "train.steps=many"]) == 2
    assert "steps" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["pretrain", "--config", str(recipe), f"out_dir={tmp_path / 'e'}", f"data.paths=[{empty}]"]) == 2
    assert "empty" in capsys.readouterr().err.lower()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    assert main(["pretrain", "--config", str(recipe), f"out_dir={tmp_path / 'b'}", f"data.paths=[{bad}]"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "line 2" in err and "text" in err


def test_resume_without_checkpoints_is_an_error(recipe, tmp_path, capsys):
    assert main(["pretrain", "--config", str(recipe), f"out_dir={tmp_path}", *MODEL, "--resume"]) == 2
    assert "no checkpoints" in capsys.readouterr().err


def test_changed_corpus_is_tokenized_again(recipe, tmp_path):
    from lmforge.data.corpus import CorpusInfo

    other = tmp_path / "other.jsonl"
    other.write_text("".join(f'{{"text": "document number {i} about nothing much"}}\n' for i in range(40)))
    short = [f"out_dir={tmp_path / 'run'}", *MODEL, "train.steps=2"]
    assert main(["pretrain", "--config", str(recipe), *short]) == 0
    first = CorpusInfo.load(tmp_path / "run" / "data")
    assert main(["pretrain", "--config", str(recipe), *short, f"data.paths=[{other}]"]) == 0
    second = CorpusInfo.load(tmp_path / "run" / "data")
    assert second.sources == [str(other.resolve())] != first.sources
    assert second.num_documents["train"] + second.num_documents["val"] == 40


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_under_torchrun_equal_one_with_accumulation(recipe, tmp_path, strategy):
    """Journey 4: `torchrun ... -m lmforge.cli pretrain` with two processes (gloo) trains the model
    that one process accumulating the same global batch over two micro-batches trains, and exits
    cleanly: DDP on one machine (`--standalone`), FSDP2 through the multi-node rendezvous flags."""
    steps = ["train.steps=4", "train.save_every=4", "train.eval_every=4"]
    single = run(recipe, tmp_path / "one", *steps)
    assert single.wait(timeout=300) == 0, single.stderr.read()
    launch = (["--standalone"] if strategy == "ddp" else  # port 0: the c10d store picks a free one
              ["--nnodes", "1", "--node_rank", "0", "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0"])
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "--nproc_per_node", "2", "-m", "lmforge.cli",
           "pretrain", "--config", str(recipe), f"out_dir={tmp_path / 'two'}", *MODEL, *steps, "train.grad_accum=1",
           f"train.strategy={strategy}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    a = load_file(tmp_path / "one" / "model" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert not torch.equal(a["model.norm.weight"], torch.ones_like(a["model.norm.weight"]))  # it trained
