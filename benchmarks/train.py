"""Training speed: lmforge's training step vs transformers' LlamaForCausalLM in the same AdamW loop.

Config: vocab 8192, hidden 384, 6 layers, 6 heads, 2 KV heads, MLP 1024; sequence 256, batch 8;
fp32 and bf16 autocast. Prints tokens/s, MFU against this machine's measured matmul peak (FLOPs
per token = 6 x matmul parameters + attention, PaLM's count), and one `RESULT` line per case."""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F

from lmforge.checkpoint import save_model
from lmforge.model import Transformer
from lmforge.presets import preset
from lmforge.train.loop import Trainer, TrainConfig, measure_peak_flops
from lmforge.train.losses import causal_lm_loss


class RandomTokens:
    """Global batches of random tokens (the content does not change the speed)."""

    def __init__(self, vocab: int, batch: int, seq_len: int) -> None:
        self.generator = torch.Generator().manual_seed(0)
        self.vocab, self.batch, self.seq_len = vocab, batch, seq_len

    def next_batch(self) -> dict[str, torch.Tensor]:
        tokens = torch.randint(0, self.vocab, (self.batch, self.seq_len + 1), generator=self.generator)
        return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def default_precisions() -> list[str]:
    bf16 = torch.cuda.is_available() or torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return ["fp32", "bf16"] if bf16 else ["fp32"]


def timed_pair(ours, reference, warmup: int, steps: int) -> tuple[float, float]:
    """Seconds per step of each, from alternating single steps (so drift in the machine's speed
    hits both alike); the median step of each is kept."""
    for _ in range(warmup):
        ours()
        reference()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(steps):
        for fn, out in ((ours, times[0]), (reference, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return tuple(sorted(t)[len(t) // 2] for t in times)  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=7, help="timed steps per case and library")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per case")
    parser.add_argument("--precisions", nargs="+", default=default_precisions(),
                        help="fp32 and/or bf16 (autocast); bf16 is measured by default only on CPUs with "
                             "bf16 instructions, since elsewhere it is emulated and many times slower")
    args = parser.parse_args()

    import transformers

    config = preset("tiny", max_position_embeddings=args.seq_len)
    scratch = tempfile.TemporaryDirectory()  # removed when the benchmark exits
    workdir = scratch.name
    init = Transformer(config)
    init.init_weights(seed=0)
    save_model(init, workdir + "/init")
    flops = config.flops_per_token(args.seq_len)
    tokens = args.batch * args.seq_len
    source = RandomTokens(config.vocab_size, args.batch, args.seq_len)

    rows = []
    for precision in args.precisions:
        peak = measure_peak_flops(torch.bfloat16 if precision == "bf16" else torch.float32)
        ours = Transformer(config)
        ours.load_state_dict(init.state_dict())
        cfg = TrainConfig(steps=10**6, micro_batch_size=args.batch, lr=1e-4, warmup_steps=0, precision=precision)
        trainer = Trainer(ours, cfg, source, causal_lm_loss, workdir + "/run")

        ref = transformers.LlamaForCausalLM.from_pretrained(workdir + "/init", dtype=torch.float32)
        ref.train()
        optimizer = torch.optim.AdamW(ref.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

        def ref_step() -> None:
            batch = source.next_batch()
            with autocast:
                logits = ref(input_ids=batch["input_ids"]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        t_ours, t_ref = timed_pair(lambda: trainer.train_step(source.next_batch()), ref_step, args.warmup, args.steps)
        rows.append((f"train_{precision}", tokens / t_ours, tokens / t_ref, peak))

    print(f"\n{'case':<14}{'lmforge tok/s':>15}{'MFU':>7}{'transformers tok/s':>20}{'MFU':>7}{'ratio':>8}")
    for name, a, b, peak in rows:
        print(f"{name:<14}{a:>15.0f}{a * flops / peak:>7.0%}{b:>20.0f}{b * flops / peak:>7.0%}{a / b:>8.2f}")
    print(f"(measured matmul peak: {', '.join(f'{n}: {p / 1e9:.0f} GFLOP/s' for n, _, _, p in rows)})\n")
    for name, a, b, _ in rows:
        print(f"RESULT {name} lmforge={a:.0f} reference={b:.0f} unit=tok/s ratio={a / b:.2f}")


if __name__ == "__main__":
    main()
