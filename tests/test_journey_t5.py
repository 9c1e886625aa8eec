"""Journey: fine-tune a FLAN-T5-style checkpoint through the command line: a T5ForConditionalGeneration
directory saved by transformers and {"input", "target"} JSONL → `lmforge sft` (LoRA, configs/sft-t5-tiny.yaml)
→ a PEFT adapter that PEFT itself loads → greedy generation from the adapter (PEFT's greedy reply) →
`lmforge merge` → `AutoModelForSeq2SeqLM` with equal logits."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import torch
import transformers as tf
from t5_models import pairs, save_tiny_t5, write_pairs

from lmforge.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PREFIX = "summarize: "
MAX_NEW = 12


def generate_reply(checkpoint: Path, text: str, capsys) -> str:
    """What `lmforge generate --checkpoint ADAPTER --prompt TEXT --temperature 0` prints."""
    capsys.readouterr()  # what earlier commands printed
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", text, "--temperature", "0",
                 "--max-new-tokens", str(MAX_NEW)]) == 0
    return capsys.readouterr().out.strip()


@torch.no_grad()
def peft_reply(model: torch.nn.Module, tokenizer, text: str) -> str:
    ids = tokenizer(text, return_tensors="pt").input_ids
    out = model.generate(input_ids=ids, max_new_tokens=MAX_NEW, do_sample=False, num_beams=1)
    return tokenizer.decode(out[0], skip_special_tokens=True).strip()  # as `generate_reply` reads the CLI's line


def test_t5_finetune_journey(tmp_path, capsys):
    base = save_tiny_t5(tmp_path / "flan-t5", seed=1)
    data = write_pairs(tmp_path / "pairs.jsonl", pairs(64, seed=1))
    run = tmp_path / "lora"
    assert main(["sft", "--config", str(CONFIGS / "sft-t5-tiny.yaml"), f"base={base}", f"out_dir={run}",
                 f"data.datasets=[{{path: {data}, prefix: '{PREFIX}'}}]", "data.val_fraction=0",
                 "data.max_source_len=48", "data.max_target_len=16", "train.steps=16", "train.lr=1e-2",
                 "train.warmup_steps=1", "train.log_every=1", "train.save_every=1000", "train.eval_every=1000"]) == 0
    curve = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert sum(curve[-4:]) < sum(curve[:4]), curve
    adapter = run / "adapter"
    config = peft.PeftConfig.from_pretrained(adapter)
    assert (config.peft_type, config.task_type, sorted(config.target_modules)) == ("LORA", "SEQ_2_SEQ_LM", ["q", "v"])

    tuned = peft.PeftModel.from_pretrained(tf.T5ForConditionalGeneration.from_pretrained(base), adapter).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(base)
    texts = [PREFIX + pairs(1, seed=1)[0]["input"], PREFIX + "small bird sings old"]  # trained on, and not
    replies = [peft_reply(tuned, tokenizer, text) for text in texts]
    assert all(replies) and [generate_reply(adapter, text, capsys) for text in texts] == replies

    merged = tmp_path / "merged"
    assert main(["merge", "--checkpoint", str(adapter), "--out", str(merged)]) == 0
    ids = tokenizer(texts[0], return_tensors="pt").input_ids
    decoder = torch.tensor([[0, *tokenizer(replies[0]).input_ids]])
    with torch.no_grad():
        want = tuned(input_ids=ids, decoder_input_ids=decoder).logits
        got = tf.AutoModelForSeq2SeqLM.from_pretrained(merged).eval()(input_ids=ids, decoder_input_ids=decoder).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        plain = tf.AutoModelForSeq2SeqLM.from_pretrained(base).eval()(input_ids=ids, decoder_input_ids=decoder).logits
        assert (plain - want).abs().max() > 1e-2  # the merged weights hold the adapter
