"""Journey 2, fine-tune a checkpoint they already have, through the command line alone: a Qwen2
directory saved by transformers and Alpaca JSONL → `lmforge sft` → a PEFT adapter that PEFT itself
loads → `lmforge generate` from the adapter (PEFT's greedy reply) → `lmforge merge` (transformers
logits) → `lmforge export gguf` (llama.cpp's logits and greedy reply); then QLoRA by one override."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import llama_cpp
import numpy as np
import peft
import pytest
import torch
import transformers as tf
from chat_data import write_jsonl
from safetensors.torch import load_file

from lmforge.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NAMES = ["Alice", "Bruno", "Chen", "Dara", "Emil", "Farah", "Gita", "Hugo", "Ines", "Jonas", "Kemal", "Lena",
         "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tess", "Umar", "Vera", "Wen", "Yusuf"]
INSTRUCTION = "Greet the person."
MAX_NEW = 16


def their_checkpoint(root: Path, chat_base: Path) -> Path:
    """A tiny Qwen2 (tied embeddings, attention biases) saved by transformers, with a ChatML tokenizer.
    Initialised at std 0.2: at transformers' 0.02 the tied head keeps every logit near 0, and no
    LoRA update can make a reply likely, as a trained checkpoint's head can."""
    ref = json.loads((chat_base / "config.json").read_text())
    config = tf.Qwen2Config(vocab_size=ref["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            bos_token_id=ref["bos_token_id"], eos_token_id=ref["eos_token_id"],
                            pad_token_id=ref["pad_token_id"], tie_word_embeddings=True, initializer_range=0.2)
    torch.manual_seed(0)
    tf.Qwen2ForCausalLM(config).save_pretrained(root)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(chat_base / name, root / name)
    return root


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def sft(run: Path, base: Path, data: Path, *overrides: str) -> Path:
    assert main(["sft", "--config", str(CONFIGS / "sft-tiny.yaml"), f"base={base}", f"out_dir={run}",
                 f"data.datasets=[{{path: {data}}}]", "data.val_fraction=0", "data.max_len=64", "train.steps=30",
                 "train.micro_batch_size=8", "train.lr=1e-2", "train.warmup_steps=2", "train.log_every=1",
                 "train.save_every=1000", "train.eval_every=1000", *overrides]) == 0
    return run / "adapter"


def hf_model(path: Path) -> torch.nn.Module:
    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def chat_prompt(tokenizer, name: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": f"{INSTRUCTION}\n\n{name}"}],
                                         add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stop_ids(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]


@torch.no_grad()
def peft_reply(model: torch.nn.Module, tokenizer, prompt: list[int]) -> str:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False,
                         eos_token_id=stop_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)


def cli_reply(checkpoint: Path, name: str, capsys) -> str:
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(checkpoint), "--chat", "--prompt", f"{INSTRUCTION}\n\n{name}",
                 "--temperature", "0", "--max-new-tokens", str(MAX_NEW)]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n")
    return out[:-1]


def llama_cpp_run(path: Path, prompt: list[int], stops: list[int]) -> tuple[torch.Tensor, list[int]]:
    """llama.cpp's logits over `prompt` and its greedy continuation."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, verbose=False, logits_all=True,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm.eval(prompt)
    logits = torch.from_numpy(np.array(llm.scores[: len(prompt)], dtype=np.float32))
    reply = []
    for token in llm.generate(prompt, temp=0.0, reset=True):
        if token in stops or len(reply) == MAX_NEW:
            break
        reply.append(token)
    return logits, reply


def assert_style(reply: str) -> None:
    assert reply.startswith("Hello ") and reply.endswith(", welcome!"), reply


@pytest.mark.slow
def test_finetune_journey(tmp_path, chat_base, capsys):
    base = their_checkpoint(tmp_path / "qwen2", chat_base)
    data = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": INSTRUCTION, "input": name, "output": f"Hello {name}, welcome!"} for name in NAMES[:20]])

    adapter = sft(tmp_path / "lora", base, data)
    curve = losses(tmp_path / "lora")
    log = [f"LoRA loss {curve[0]:.3f} -> {curve[-1]:.3f}"]
    assert curve[-1] < 0.3 * curve[0]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    assert peft.PeftConfig.from_pretrained(adapter).peft_type == "LORA"

    tuned = peft.PeftModel.from_pretrained(hf_model(base), adapter).eval()
    tokenizer = tf.PreTrainedTokenizerFast.from_pretrained(base)
    for name in (NAMES[0], NAMES[-1]):  # one trained on, one not
        prompt = chat_prompt(tokenizer, name)
        theirs = peft_reply(tuned, tokenizer, prompt)
        assert cli_reply(adapter, name, capsys) == theirs
        assert_style(theirs)
        log.append(f"{name}: {theirs!r}")
    with tuned.disable_adapter():
        assert not peft_reply(tuned, tokenizer, prompt).startswith("Hello")

    merged = tmp_path / "merged"
    assert main(["merge", "--checkpoint", str(adapter), "--out", str(merged)]) == 0
    ids = torch.tensor([prompt])
    with torch.no_grad():
        expected = hf_model(merged)(ids).logits[0]
        torch.testing.assert_close(expected, tuned(ids).logits[0], atol=1e-4, rtol=1e-4)
        assert (expected - hf_model(base)(ids).logits[0]).abs().max() > 1e-1

    gguf = tmp_path / "merged.gguf"
    assert main(["export", "gguf", "--checkpoint", str(merged), "--out", str(gguf), "--dtype", "f32"]) == 0
    logits, reply = llama_cpp_run(gguf, prompt, stop_ids(tokenizer))
    torch.testing.assert_close(logits, expected, atol=1e-3, rtol=1e-4)
    assert tokenizer.decode(reply, skip_special_tokens=True) == theirs

    qlora = sft(tmp_path / "qlora", base, data, "adapter.method=qlora")
    q_curve = losses(tmp_path / "qlora")
    log.append(f"QLoRA loss {q_curve[0]:.3f} -> {q_curve[-1]:.3f}")
    assert q_curve[-1] < 0.3 * q_curve[0]
    # Same first batch and zero-initialised adapters: only the NF4 rounding of the base moves the first loss.
    assert 1e-3 < abs(q_curve[0] - curve[0]) < 0.5
    assert peft.PeftConfig.from_pretrained(qlora).peft_type == "LORA"
    assert load_file(qlora / "adapter_model.safetensors").keys() == load_file(adapter / "adapter_model.safetensors").keys()
    q_tuned = peft.PeftModel.from_pretrained(hf_model(base), qlora).eval()
    theirs = peft_reply(q_tuned, tokenizer, chat_prompt(tokenizer, NAMES[0]))
    assert cli_reply(qlora, NAMES[0], capsys) == theirs
    assert_style(theirs)
    print("; ".join(log))
