"""`lmforge pretrain` with a T5 preset: span corruption on the tokenized corpus, through the one loop. The saved
model is T5 to transformers (its loss on the validation chunks equals the logged `val_loss`), training lowers
that loss, and a run resumed from a checkpoint ends with the uninterrupted run's weights."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from lmforge.cli import main
from lmforge.data.corpus import CorpusInfo, PackedSequences
from lmforge.data.seq2seq import collate
from lmforge.data.span_corruption import SpanCorruptedChunks
from lmforge.tokenizer import Tokenizer
from lmforge.world.documents import write_pretraining_corpus
from lmforge.world.people import make_world

CONFIG = Path(__file__).parent.parent / "configs" / "pretrain-t5-tiny.yaml"
MODEL = ["model.overrides.hidden_size=32", "model.overrides.head_dim=8", "model.overrides.intermediate_size=64",
         "model.overrides.num_attention_heads=4"]
TRAIN = ["data.seq_len=32", "data.workers=1", "data.eval_batches=2", "train.steps=40", "train.micro_batch_size=8",
         "train.lr=1.0e-2", "train.warmup_steps=2", "train.log_every=5", "train.eval_every=20", "train.save_every=20",
         "train.keep_last=5"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> list[str]:
    """`lmforge pretrain`'s arguments: the T5 recipe on the world's biographies, with a T5 tokenizer from the CLI."""
    root = tmp_path_factory.mktemp("pretrain-t5")
    corpus = write_pretraining_corpus(make_world(0, n_people=20, n_companies=4), root / "corpus.jsonl", variants=2)
    assert main(["tokenizer", "train", "--kind", "t5", "--input", str(corpus), "--vocab-size", "300",
                 "--extra-ids", "10", "--out", str(root / "tok")]) == 0
    return ["--config", str(CONFIG), f"data.paths=[{corpus}]", f"data.tokenizer={root / 'tok'}", *MODEL, *TRAIN]


@pytest.fixture(scope="module")
def trained(recipe, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert main(["pretrain", *recipe, f"out_dir={out}"]) == 0
    return out


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_saved_model_is_t5_and_its_span_corruption_loss_is_the_logged_one(trained):
    tokenizer = Tokenizer.from_dir(trained / "model")
    hf = transformers.T5ForConditionalGeneration.from_pretrained(trained / "model").eval()
    info = CorpusInfo.load(trained / "data")
    chunks = SpanCorruptedChunks(PackedSequences(trained / "data" / "val.bin", 1, info.dtype).tokens, tokenizer,
                                 inputs_length=32, seed=0)
    used = min(len(chunks), 16)  # two validation batches of 8
    assert used > 8
    total = count = 0.0
    for start in (0, 8):
        batch = collate([chunks[i] for i in range(start, min(start + 8, used))], tokenizer.pad_id, tokenizer.pad_id)
        with torch.no_grad():
            loss = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      labels=batch["labels"]).loss
        tokens = int((batch["labels"] != -100).sum())
        total, count = total + float(loss) * tokens, count + tokens
    evaluations = [r for r in records(trained) if "val_loss" in r]
    logged = evaluations[-1]
    assert [r["step"] for r in evaluations] == [20, 40]
    assert logged["val_loss"] == pytest.approx(total / count, rel=1e-4)
    # Untrained, the loss is about ln(vocabulary); training learns the sentinels, </s> and frequent tokens.
    assert logged["val_loss"] < evaluations[0]["val_loss"]
    assert logged["val_loss"] < math.log(hf.config.vocab_size) - 1


def test_a_resumed_run_ends_as_the_uninterrupted_one(recipe, trained, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(trained, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000040")
    shutil.rmtree(resumed / "model")
    assert main(["pretrain", *recipe, f"out_dir={resumed}", "--resume"]) == 0
    expected, got = (load_file(run / "model" / "model.safetensors") for run in (trained, resumed))
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


def test_a_tokenizer_without_sentinels_is_a_clear_error(recipe, tmp_path, capsys):
    corpus = next(a for a in recipe if a.startswith("data.paths="))[len("data.paths=["):-1]
    assert main(["tokenizer", "train", "--input", corpus, "--vocab-size", "300", "--out", str(tmp_path / "bpe")]) == 0
    assert main(["pretrain", *recipe, f"out_dir={tmp_path / 'out'}", f"data.tokenizer={tmp_path / 'bpe'}"]) == 2
    assert "no sentinel token <extra_id_0>" in capsys.readouterr().err
