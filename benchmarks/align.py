"""PPO step time split into rollout, scoring and update, and rollout speed against plain
generation of the same batch with the same engine settings.

The policy is the `tiny` preset (vocab 2048, hidden 384, 6 layers) with LoRA r=16 on every linear
layer; the reward model has the same trunk with a scalar head (random weights: speed only). Each
PPO iteration samples 32 prompts x 64 new tokens. The rollout is timed inside `PPOTrainer.rollout`:
sampling (the policy's log-probs and values are read off the generating forward passes), the
reference's forward pass, and the reward model. "Plain generation" is `Engine.generate` of the
same prompts and sampling parameters on the same model (LoRA unmerged, as the rollout runs it).
Two ratios: sampling alone against plain generation, and sampling plus the reference pass."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


from lmforge.align.ppo import PPOConfig, PPOTrainer, Prompt
from lmforge.align.reward import RewardModel, RewardScorer
from lmforge.checkpoint import save_model
from lmforge.config import preset
from lmforge.data.world import make_world, questions, write_pretraining_corpus
from lmforge.generate.engine import Engine, SamplingParams
from lmforge.model import Transformer
from lmforge.peft.method import AdapterConfig, apply_method
from lmforge.tokenizer import train_tokenizer


class Timed:
    """Wraps a callable and accumulates the time spent in it."""

    def __init__(self, fn) -> None:
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="prompts per rollout")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens sampled per response")
    parser.add_argument("--iterations", type=int, default=3, help="timed PPO iterations (after one warm-up)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp())
    world = make_world(0, n_people=60)
    corpus = write_pretraining_corpus(world, root / "corpus.jsonl")
    tokenizer = train_tokenizer([corpus], 2048, root / "tok", show_progress=False)
    config = preset("tiny", vocab_size=tokenizer.vocab_size, max_position_embeddings=256,
                    eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    lm = Transformer(config)
    lm.init_weights(seed=0)
    save_model(lm, root / "policy", tokenizer=tokenizer)
    scorer = RewardScorer(RewardModel.from_lm(lm, tokenizer.pad_id, seed=0), tokenizer)
    scorer.score_ids = scoring = Timed(scorer.score_ids)

    prompts = [Prompt([{"role": "user", "content": q.question}]) for q in questions(world, "train")]
    ppo_config = PPOConfig.model_validate({
        "out_dir": str(root / "out"), "policy": str(root / "policy"), "reward": str(root / "unused"),
        "prompts": str(root / "unused"),
        "ppo": {"batch_size": args.batch, "mini_batch_size": 16, "ppo_epochs": 1, "max_new_tokens": args.new_tokens}})
    policy = apply_method(lm, AdapterConfig(method="lora", r=16, alpha=32, targets="all-linear"))
    trainer = PPOTrainer(ppo_config, policy, tokenizer, scorer, prompts)
    trainer.sample = sampling = Timed(trainer.sample)
    # Responses run to the token limit: a random model rarely samples a stop token.
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=0)
    engine = Engine(policy)

    rollout_s = update_s = score_s = sample_s = plain_s = 0.0
    tokens = 0
    for it in range(args.iterations + 1):
        indices = trainer.batch_indices()
        scoring.seconds = sampling.seconds = 0.0
        start = time.perf_counter()
        rollout = trainer.rollout(indices)
        middle = time.perf_counter()
        trainer.update(rollout)
        end = time.perf_counter()
        batch = [trainer.prompt_ids[i] for i in indices]
        plain_start = time.perf_counter()
        generated = engine.generate(batch, params)
        plain = time.perf_counter() - plain_start
        trainer.iteration += 1
        if it == 0:
            continue  # warm-up
        rollout_s += middle - start
        update_s += end - middle
        score_s += scoring.seconds
        sample_s += sampling.seconds
        plain_s += plain
        tokens += int(rollout.mask.sum())
        assert sum(map(len, generated)) > 0

    n = args.iterations
    generation_s = rollout_s - score_s
    print(f"\n{'phase':<34}{'seconds/iteration':>18}")
    for name, value in (("rollout: sampling", sample_s), ("rollout: reference pass", generation_s - sample_s),
                        ("rollout: reward-model scoring", score_s), ("update (policy + value)", update_s)):
        print(f"{name:<34}{value / n:>18.3f}")
    plain_tps = n * args.batch * args.new_tokens / plain_s
    print(f"\n{'case':<34}{'lmforge tok/s':>15}{'plain generate tok/s':>22}{'ratio':>8}")
    for name, seconds in (("ppo sampling vs plain generation", sample_s), ("sampling + reference pass", generation_s)):
        tps = tokens / seconds
        print(f"{name:<34}{tps:>15.1f}{plain_tps:>22.1f}{tps / plain_tps:>8.2f}")
    rollout_tps = tokens / generation_s
    print(f"\nRESULT ppo_rollout lmforge={rollout_tps:.1f} reference={plain_tps:.1f} unit=tok/s "
          f"ratio={rollout_tps / plain_tps:.2f}")

if __name__ == "__main__":
    main()
