"""`lmforge demo`: every stage that exists so far, on built-in data, with a markdown report.

Today: train a BPE tokenizer (on lmforge's own source, which every installation has), build a
tiny Llama-family model, save it as a Hugging Face directory, load it back, generate, and size up
real presets on the meta device. Later stages (pretraining on the built-in world, SFT,
alignment, retrieval) add their sections here.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import lmforge
from lmforge.checkpoint import save_model
from lmforge.config import PRESETS, preset
from lmforge.generate.engine import SamplingParams
from lmforge.generate.session import Session
from lmforge.generate.text import stop_token_ids
from lmforge.model import Transformer
from lmforge.tokenizer import train_tokenizer

REAL_PRESETS = ("llama2-7b", "llama3-8b", "mistral-7b", "mixtral-8x7b", "qwen2.5-0.5b", "gpt2")


def run_demo(out: str | Path, seed: int = 0) -> Path:
    """Run the demo into `out` and return the path of its report."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    sections = []

    sources = sorted(Path(lmforge.__file__).parent.rglob("*.py"))
    corpus = out / "corpus.txt"
    corpus.write_text("\n\n".join(path.read_text() for path in sources))
    start = time.perf_counter()
    tokenizer = train_tokenizer([corpus], 1024, out / "tokenizer", show_progress=False)
    sample = "def forward(self, x: Tensor) -> Tensor:"
    ids = tokenizer.encode(sample)
    sections.append(
        "## Tokenizer\n\n"
        f"Byte-level BPE, {tokenizer.vocab_size} tokens, trained on lmforge's {len(sources)} source files "
        f"in {time.perf_counter() - start:.1f} s.\n\n"
        f"`{sample}` → {len(ids)} tokens: {' | '.join(f'`{tokenizer.decode([i])}`' for i in ids)}\n"
    )
    print(f"[demo] tokenizer: {tokenizer.vocab_size} tokens")

    config = preset("micro", vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                    eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    model = Transformer(config)
    model.init_weights(seed)
    model_dir = save_model(model, out / "model", tokenizer=tokenizer)
    session = Session.load(model_dir)
    params = SamplingParams(max_new_tokens=48, temperature=0.8, top_k=50, seed=seed,
                            stop_token_ids=stop_token_ids(session.model.config, tokenizer))
    start = time.perf_counter()
    text = "".join(session.stream(session.encode("def "), params))
    elapsed = time.perf_counter() - start
    sections.append(
        "## Model\n\n"
        f"A randomly initialised Llama-family model ({model.num_parameters():,} parameters, "
        f"{config.num_hidden_layers} layers, {config.num_attention_heads} heads, {config.num_key_value_heads} KV heads) "
        f"saved as a Hugging Face directory at `{model_dir}` and loaded back. Untrained, so its text is noise:\n\n"
        f"```\ndef {text}\n```\n\n({elapsed:.2f} s; pretraining arrives with the next stage.)\n"
    )
    print(f"[demo] generated: def {text!r}")

    rows = ["| preset | parameters | training GFLOPs/token | KV cache per token (bf16) |", "|---|---:|---:|---:|"]
    for name in REAL_PRESETS:
        cfg = PRESETS[name]
        with torch.device("meta"):
            built = sum(p.numel() for p in Transformer(cfg).parameters())
        rows.append(f"| {name} | {built / 1e9:.2f} B | {cfg.flops_per_token(4096) / 1e9:.1f} | "
                    f"{cfg.kv_cache_bytes_per_token() / 1024:.0f} KiB |")
    sections.append("## Real sizes (built on the meta device)\n\n" + "\n".join(rows) + "\n")

    report = out / "report.md"
    report.write_text("# lmforge demo\n\n" + "\n".join(sections))
    print(f"[demo] report: {report}")
    return report
