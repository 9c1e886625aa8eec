"""Journey 3, Pretrain on their own text, through the command line alone: a folder of `.txt` and
JSONL → `lmforge tokenizer train` → `lmforge pretrain` with the README's recipe (progress,
validation loss, loss curve) → the process is SIGKILLed → `--resume` ends where an uninterrupted
run ends → `lmforge eval` reports the perplexity transformers computes on held-out text."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.cli import main
from lmforge.train.run_dir import STATE_FILE, RunDir
from lmforge.world.documents import pretraining_corpus
from lmforge.world.people import make_world

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL = ["model.overrides.hidden_size=32", "model.overrides.intermediate_size=64", "model.overrides.num_hidden_layers=2",
         "model.overrides.max_position_embeddings=128", "data.seq_len=32", "data.workers=1", "data.eval_batches=2",
         "train.steps=12", "train.micro_batch_size=4", "train.grad_accum=2", "train.warmup_steps=2",
         "train.log_every=2", "train.eval_every=4", "train.save_every=2", "train.keep_last=20"]


def write_corpus(root: Path) -> tuple[Path, list[str]]:
    """A folder of biographies (two .txt files of blank-line separated documents and a JSONL file)
    and, apart from it, the first twenty words of four held-out ones."""
    docs = pretraining_corpus(make_world(0, n_people=20, n_companies=4), variants=2)
    held, docs = [" ".join(d.split()[:20]) for d in docs[:4]], docs[4:]
    corpus = root / "corpus"
    (corpus / "more").mkdir(parents=True)
    third = len(docs) // 3
    (corpus / "a.txt").write_text("\n\n".join(docs[:third]) + "\n")
    (corpus / "more" / "b.txt").write_text("\n\n".join(docs[third : 2 * third]) + "\n")
    (corpus / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[2 * third :]))
    return corpus, held


def pretrain(corpus: Path, tok: Path, out: Path, *extra: str, stderr: int = subprocess.PIPE) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lmforge.cli", "pretrain", "--config", str(CONFIGS / "pretrain-tiny.yaml"),
           f"data.paths=[{corpus}]", f"data.tokenizer={tok}", f"out_dir={out}", *SMALL, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def finish(process: subprocess.Popen) -> str:
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    return stderr


def kill_after_first_checkpoint(run: subprocess.Popen, out: Path, last: str) -> None:
    """SIGKILL a training run (its stderr unread: a full pipe would stall it) once `out` holds a checkpoint, and
    check that it died before its `last` checkpoint."""
    deadline = time.monotonic() + 300
    while not RunDir(out).checkpoints() and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert run.returncode == -signal.SIGKILL
    assert RunDir(out).checkpoints() and RunDir(out).checkpoints()[-1].name != last


def held_out_perplexity(model_dir: Path, texts: list[str]) -> float:
    """exp(mean token NLL) by transformers: each text scored after the EOS that separates
    pretraining documents (the tokenizer adds no BOS)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert 0 < len(ids) < model.config.max_position_embeddings
        inputs = torch.tensor([[tokenizer.eos_token_id, *ids]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(inputs).logits[0, :-1].float(), -1)
        nll -= logprobs.gather(-1, inputs[0, 1:, None]).sum().item()
        count += len(ids)
    return math.exp(nll / count)


@pytest.mark.slow
def test_pretrain_journey(tmp_path, capsys):
    corpus, held = write_corpus(tmp_path)
    tok = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "300", "--out", str(tok)]) == 0
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(tok)
    assert len(hf_tok) == 300 and hf_tok.decode(hf_tok(held[0])["input_ids"]) == held[0]

    straight = tmp_path / "straight"
    progress = finish(pretrain(corpus, tok, straight))
    assert "12/12" in progress  # the progress bar reached the last step
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8, 12] and losses[-1] < losses[0]
    assert (straight / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    killed = tmp_path / "killed"
    kill_after_first_checkpoint(pretrain(corpus, tok, killed, stderr=subprocess.DEVNULL), killed, "step-000012")
    finish(pretrain(corpus, tok, killed, "--resume"))

    a, b = (load_file(run_dir / "model" / "model.safetensors") for run_dir in (straight, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (torch.load(RunDir(d).checkpoints()[-1] / STATE_FILE, weights_only=True) for d in (straight, killed))
    assert sa["step"] == sb["step"] == 12 and sa["data"] == sb["data"]
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert torch.equal(pa["exp_avg"], pb["exp_avg"]) and torch.equal(pa["exp_avg_sq"], pb["exp_avg_sq"])

    held_path = tmp_path / "held-out.jsonl"
    held_path.write_text("".join(json.dumps({"text": t}) + "\n" for t in held))
    results = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(straight / "model"), "--task", str(held_path),
                 "--out", str(results)]) == 0
    reported = json.loads(results.read_text())["metrics"]["perplexity"]
    assert reported == pytest.approx(held_out_perplexity(straight / "model", held), rel=1e-4)
    assert f"{reported:.4f}" in capsys.readouterr().out
