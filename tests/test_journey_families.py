"""Journey 10, the user's own Gemma 2 or Qwen3, through the command line: a directory saved by transformers
(with a byte-level BPE tokenizer and a ChatML template beside it) → `lmforge sft` with LoRA (the loss goes
down) → an adapter that `peft.PeftModel` loads over the transformers model with equal logits → `lmforge
merge` (the chat markers' trained rows, `adapter.trainable_tokens`, merged under Gemma's scaled embedding
too) → a directory transformers loads with equal logits and the same greedy reply → `lmforge serve`
answering the official `openai` client with lmforge's own greedy reply. Qwen2's journey
(`test_journey_finetune.py`) also exports GGUF; `gguf_step` is where these families join it."""

from __future__ import annotations

import json
from pathlib import Path
from unittest.mock import patch

import openai
import peft
import pytest
import torch
import transformers as tf
from chat_data import write_jsonl
from conftest import SHARPEN
from hf_models import tiny_hf_model
from live_server import LiveServer

import lmforge.model
from lmforge.checkpoint import load_model
from lmforge.cli import main
from lmforge.generate.session import Session
from lmforge.serve.server import create_app
from lmforge.tokenizer import train_tokenizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NAMES = ["Alice", "Bruno", "Chen", "Dara", "Emil", "Farah", "Gita", "Hugo", "Ines", "Jonas", "Kemal", "Lena"]
INSTRUCTION = "Greet the person."
MAX_NEW = 12
VOCAB = 320
# The families `lmforge export gguf` writes; once it writes one of these, add it here and its journey
# also checks llama.cpp's logits and greedy reply on the merged directory (`gguf_step`).
GGUF_FAMILIES = frozenset({"gemma2", "qwen3"})


def their_checkpoint(root: Path, family: str) -> Path:
    """A tiny `family` model saved by transformers, matrices sharpened so that greedy picks are far from
    ties, with a BPE tokenizer (ChatML template) trained on the greetings beside it."""
    corpus = root.parent / f"{family}-corpus.txt"
    corpus.write_text("".join(f"{INSTRUCTION}\n\n{name}\nHello {name}, welcome!\n" for name in NAMES) * 10)
    tokenizer = train_tokenizer([corpus], VOCAB, root, show_progress=False)
    scale = {"query_pre_attn_scalar": 16} if family == "gemma2" else {}  # head_dim, as llama.cpp's gemma2 assumes
    hf = tiny_hf_model(family, vocab_size=VOCAB, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                       pad_token_id=tokenizer.pad_id, **scale)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() >= 2:
                p.mul_(SHARPEN)
    hf.save_pretrained(root)
    return root


def chat(name: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{INSTRUCTION}\n\n{name}"}]


def hf_model(path: Path) -> torch.nn.Module:
    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def hf_prompt(tokenizer, name: str) -> list[int]:
    """The chat prompt as transformers' tokenizer renders and encodes it (lmforge not involved)."""
    text = tokenizer.apply_chat_template(chat(name), add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def hf_reply(model: torch.nn.Module, tokenizer, prompt: list[int]) -> str:
    """transformers' greedy reply, stopping at EOS or `<|im_end|>`."""
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=stops,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True).strip()


def gguf_step(family: str, merged: Path, prompt: list[int], logits: torch.Tensor, reply: str) -> None:
    """Export the merged directory to GGUF and check llama.cpp's logits over `prompt` and its greedy
    reply, as `test_journey_finetune.py` does for Qwen2; for the families in GGUF_FAMILIES only."""
    if family not in GGUF_FAMILIES:
        return
    from test_export_gguf_families import ggml_gelu
    from test_journey_finetune import llama_cpp_run

    tokenizer = tf.PreTrainedTokenizerFast.from_pretrained(merged)
    gguf = merged.parent / "merged.gguf"
    assert main(["export", "gguf", "--checkpoint", str(merged), "--out", str(gguf), "--dtype", "f32"]) == 0
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    theirs, tokens = llama_cpp_run(gguf, prompt, stops)
    # GELU as ggml computes it (an f16 table), so that the comparison is of the export, not of GELU's rounding
    with patch.dict(lmforge.model.GATE_ACTIVATIONS, {"gelu_pytorch_tanh": ggml_gelu}), torch.no_grad():
        ggml_logits = load_model(merged)(torch.tensor([prompt]))[0]
    torch.testing.assert_close(ggml_logits, logits, atol=1e-2, rtol=0)  # the emulation is close to the real GELU
    torch.testing.assert_close(theirs, ggml_logits, atol=1e-3, rtol=1e-4)
    assert tokenizer.decode(tokens[:MAX_NEW], skip_special_tokens=True).strip() == reply


@pytest.mark.parametrize("family", ["gemma2", "qwen3"])
def test_family_journey(tmp_path, family):
    base = their_checkpoint(tmp_path / family, family)
    data = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [*chat(name), {"role": "assistant", "content": f"Hello {name}, welcome!"}]} for name in NAMES])

    run = tmp_path / "lora"
    assert main(["sft", "--config", str(CONFIGS / "sft-tiny.yaml"), f"base={base}", f"out_dir={run}",
                 f"data.datasets=[{{path: {data}}}]", "data.val_fraction=0", "data.max_len=48", "adapter.r=8",
                 "train.steps=12", "train.micro_batch_size=6", "train.lr=1e-2", "train.warmup_steps=2",
                 "train.log_every=1", "train.save_every=1000", "train.eval_every=1000"]) == 0
    curve = losses(run)
    assert len(curve) == 12 and curve[-1] < 0.7 * curve[0], curve
    adapter = run / "adapter"
    assert peft.PeftConfig.from_pretrained(adapter).peft_type == "LORA"

    tokenizer = tf.PreTrainedTokenizerFast.from_pretrained(base)
    prompt = hf_prompt(tokenizer, NAMES[-1])
    ids = torch.tensor([prompt])
    session = Session.load(adapter)
    assert session.chat_prompt(chat(NAMES[-1])) == prompt
    tuned = peft.PeftModel.from_pretrained(hf_model(base), adapter).eval()
    with torch.no_grad():
        expected = tuned(ids).logits[0]
        torch.testing.assert_close(session.model(ids)[0], expected, atol=1e-4, rtol=1e-4)
        assert (expected - hf_model(base)(ids).logits[0]).abs().max() > 1e-1  # the adapter matters

    merged = tmp_path / "merged"
    assert main(["merge", "--checkpoint", str(adapter), "--out", str(merged)]) == 0
    reference = hf_model(merged)
    with torch.no_grad():
        logits = reference(ids).logits[0]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    reply = hf_reply(reference, tokenizer, prompt)
    assert reply.startswith("Hello ") and reply.endswith(", welcome!"), reply  # the greeting's shape is learnt
    assert not hf_reply(hf_model(base), tokenizer, prompt).startswith("Hello")
    assert session.replies([chat(NAMES[-1])], session.greedy(MAX_NEW)) == [reply]
    gguf_step(family, merged, prompt, logits, reply)

    with LiveServer(create_app(session, model_name=family)) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        served = client.chat.completions.create(model=family, messages=chat(NAMES[-1]), max_tokens=MAX_NEW,
                                                temperature=0)
    assert served.choices[0].message.content.strip() == reply and served.usage.prompt_tokens == len(prompt)
    print(f"{family}: LoRA loss {curve[0]:.3f} -> {curve[-1]:.3f}; reply {reply!r}")
