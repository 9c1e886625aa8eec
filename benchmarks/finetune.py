"""Fine-tuning speed and memory: full, LoRA, DoRA, QLoRA, (IA)³ and prompt tuning in lmforge, each
beside the same method in transformers (+ peft), on the same model, batches and AdamW loop.

Config: the `tiny` preset (vocab 8192, hidden 384, 6 layers, 6 heads, 2 KV heads, MLP 1024);
sequence 256, batch 4; fp32 and bf16 autocast. LoRA r=8, alpha=16 on q/k/v/o (the default);
QLoRA the same over NF4 base weights (no reference: bitsandbytes' NF4 has no CPU kernels);
DoRA the LoRA settings with use_dora; (IA)³ on k/v/down_proj (down_proj feed-forward, PEFT's Llama defaults);
prompt tuning with 20 virtual tokens. Memory is the training state measured from the tensors — weights (NF4 at their
stored size) + gradients + AdamW state — not activations, and not process RSS (one process runs
every case). Prints a table and one `RESULT` line per case with a reference."""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from train import RandomTokens, default_precisions, timed_pair  # benchmarks/train.py

from lmforge.checkpoint import save_model
from lmforge.model import Transformer
from lmforge.peft import AdapterConfig, apply_method, parameter_counts
from lmforge.peft.lora import is_nf4, nf4_nbytes
from lmforge.presets import preset
from lmforge.train.loop import Trainer, TrainConfig
from lmforge.train.losses import causal_lm_loss

VIRTUAL_TOKENS = 20
METHODS = {
    "full": AdapterConfig(method="full"),
    "lora": AdapterConfig(method="lora", r=8, alpha=16),
    "dora": AdapterConfig(method="lora", r=8, alpha=16, dora=True),
    "qlora": AdapterConfig(method="qlora", r=8, alpha=16),
    "ia3": AdapterConfig(method="ia3"),
    "prompt": AdapterConfig(method="prompt", num_virtual_tokens=VIRTUAL_TOKENS, prompt_init="vocab"),
}


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of weights (NF4 at their stored size), gradients and optimizer state."""
    total = 0
    for p in model.parameters():
        total += nf4_nbytes(p) if is_nf4(p) else p.numel() * p.element_size()
        if p.grad is not None:
            total += p.grad.numel() * p.grad.element_size()
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total


def reference_model(method: str, path: str) -> torch.nn.Module | None:
    """The same method in transformers + peft, or None where there is no CPU reference."""
    import peft
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    if method in ("lora", "dora"):
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                 use_dora=method == "dora", task_type="CAUSAL_LM")
        return peft.get_peft_model(model, config)
    if method == "ia3":
        config = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                                task_type="CAUSAL_LM")
        return peft.get_peft_model(model, config)
    if method == "prompt":
        config = peft.PromptTuningConfig(num_virtual_tokens=VIRTUAL_TOKENS, prompt_tuning_init="SAMPLE_VOCAB",
                                         task_type="CAUSAL_LM")
        return peft.get_peft_model(model, config)
    return model if method == "full" else None


def reference_step(model: torch.nn.Module, source: RandomTokens, method: str, precision: str):
    """One AdamW step of `model` as a transformers user writes it (clipping as lmforge's loop)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    skip = VIRTUAL_TOKENS if method == "prompt" else 0
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> None:
        batch = source.next_batch()
        with autocast:
            logits = model(input_ids=batch["input_ids"]).logits[:, skip:]
        F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten()).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


Row = tuple[float, int, int]  # tokens/s, state bytes, trainable parameters


def measure(method: str, precision: str, init: Transformer, workdir: Path, source: RandomTokens,
            args: argparse.Namespace) -> tuple[Row, Row | None]:
    """lmforge's training step and the reference's, timed alternately."""
    tokens = args.batch * args.seq_len
    ours = apply_method(copy.deepcopy(init), METHODS[method])
    cfg = TrainConfig(steps=10**6, micro_batch_size=args.batch, lr=1e-4, warmup_steps=0, weight_decay=0.0,
                      precision=precision)
    trainer = Trainer(ours, cfg, source, causal_lm_loss, workdir / "run")
    ref = reference_model(method, str(workdir / "init"))
    ref_step, ref_optimizer = reference_step(ref.train(), source, method, precision) if ref else (lambda: None, None)
    t_ours, t_ref = timed_pair(lambda: trainer.train_step(source.next_batch()), ref_step, args.warmup, args.steps)
    row = (tokens / t_ours, state_bytes(ours, trainer.optimizer), parameter_counts(ours)[0])
    if ref is None:
        return row, None
    return row, (tokens / t_ref, state_bytes(ref, ref_optimizer), parameter_counts(ref)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case and library")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per case")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--precisions", nargs="+", default=default_precisions(),
                        help="fp32 and/or bf16 (autocast); bf16 by default only on CPUs with bf16 instructions")
    args = parser.parse_args()

    config = preset("tiny", max_position_embeddings=args.seq_len + VIRTUAL_TOKENS)
    init = Transformer(config)
    init.init_weights(seed=0)
    scratch = tempfile.TemporaryDirectory()  # removed when the benchmark exits
    workdir = Path(scratch.name)
    save_model(init, workdir / "init")
    source = RandomTokens(config.vocab_size, args.batch, args.seq_len)
    rows = [(f"{method}_{precision}", *measure(method, precision, init, workdir, source, args))
            for precision in args.precisions for method in args.methods]

    print(f"\n{'case':<14}{'lmforge tok/s':>15}{'state MB':>10}{'trainable':>12}"
          f"{'reference tok/s':>17}{'state MB':>10}{'trainable':>12}{'ratio':>8}")
    for name, (speed, mem, trainable), ref in rows:
        line = f"{name:<14}{speed:>15.0f}{mem / 2**20:>10.1f}{trainable:>12,}"
        if ref is not None:
            line += f"{ref[0]:>17.0f}{ref[1] / 2**20:>10.1f}{ref[2]:>12,}{speed / ref[0]:>8.2f}"
        else:
            line += f"{'n/a':>17}"
        print(line)
    print("(reference: transformers, + peft for lora, dora, ia3 and prompt; state = weights + gradients + AdamW "
          "state)\n")
    for name, (speed, _, _), ref in rows:
        if ref is not None:
            print(f"RESULT finetune_{name} lmforge={speed:.0f} reference={ref[0]:.0f} unit=tok/s "
                  f"ratio={speed / ref[0]:.2f}")


if __name__ == "__main__":
    main()
