"""PPO step time split into rollout, scoring and update, and rollout speed against plain
generation of the same batch with the same engine settings.

The policy is the `tiny` preset (vocab 2048, hidden 384, 6 layers) with LoRA r=16 on every linear
layer; the reward model has the same trunk with a scalar head (random weights: speed only). Each
PPO iteration samples 32 prompts x 64 new tokens. The rollout is the sampling: responses from the
generation engine, with the policy's log-probs and values read off the forward passes that
generated them. Scoring is what the reward needs once the responses are finished, two
teacher-forced passes over them: the reward model, and the frozen reference for the per-token KL
penalty. "Plain generation" is `Engine.generate` of the same prompts and sampling parameters on the
same model (LoRA unmerged, as the rollout runs it). The ratio the issue names is the rollout's
against plain generation; a second row adds the reference pass to the rollout."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


from lmforge.align.ppo import PPOConfig, PPOTrainer
from lmforge.align.reward import RewardModel, RewardScorer
from lmforge.checkpoint import save_model
from lmforge.presets import preset
from lmforge.data.chat import Prompt
from lmforge.generate.engine import Engine
from lmforge.generate.sampling import SamplingParams
from lmforge.model import Transformer
from lmforge.peft.method import AdapterConfig, apply_method
from lmforge.tokenizer import train_tokenizer
from lmforge.world.documents import questions, write_pretraining_corpus
from lmforge.world.people import make_world


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

    scratch = tempfile.TemporaryDirectory()  # removed when the benchmark exits
    root = Path(scratch.name)
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
        "ppo": {"batch_size": args.batch, "mini_batch_size": 16, "ppo_epochs": 1,
                "sampling": {"max_new_tokens": args.new_tokens}}})
    policy = apply_method(lm, AdapterConfig(method="lora", r=16, alpha=32, targets="all-linear"))
    trainer = PPOTrainer(ppo_config, policy, tokenizer, scorer, prompts)
    trainer.sample = sampling = Timed(trainer.sample)
    trainer.reference_logprobs = reference = Timed(trainer.reference_logprobs)
    # Responses run to the token limit: a random model rarely samples a stop token.
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=0)
    engine = Engine(policy)

    phases = dict.fromkeys(("rollout: sampling", "scoring: reward model", "scoring: reference log-probs",
                            "update (policy + value)"), 0.0)
    plain_s, tokens = 0.0, 0
    for it in range(args.iterations + 1):
        indices = trainer.batch_indices()
        scoring.seconds = sampling.seconds = reference.seconds = 0.0
        rollout = trainer.rollout(indices)
        start = time.perf_counter()
        trainer.update(rollout)
        update = time.perf_counter() - start
        batch = [trainer.prompt_ids[i] for i in indices]
        start = time.perf_counter()
        generated = engine.generate(batch, params)
        plain = time.perf_counter() - start
        trainer.iteration += 1
        if it == 0:
            continue  # warm-up
        for name, seconds in zip(phases, (sampling.seconds, scoring.seconds, reference.seconds, update)):
            phases[name] += seconds
        plain_s += plain
        tokens += int(rollout.mask.sum())
        assert sum(map(len, generated)) > 0

    n = args.iterations
    print(f"\n{'phase':<34}{'seconds/iteration':>18}")
    for name, seconds in phases.items():
        print(f"{name:<34}{seconds / n:>18.3f}")
    sample_s, reference_s = phases["rollout: sampling"], phases["scoring: reference log-probs"]
    plain_tps = n * args.batch * args.new_tokens / plain_s
    print(f"\n{'case':<34}{'lmforge tok/s':>15}{'plain generate tok/s':>22}{'ratio':>8}")
    for name, seconds in (("rollout vs plain generation", sample_s),
                          ("rollout + reference pass", sample_s + reference_s)):
        tps = tokens / seconds
        print(f"{name:<34}{tps:>15.1f}{plain_tps:>22.1f}{tps / plain_tps:>8.2f}")
    rollout_tps = tokens / sample_s
    print(f"\nRESULT ppo_rollout lmforge={rollout_tps:.1f} reference={plain_tps:.1f} unit=tok/s "
          f"ratio={rollout_tps / plain_tps:.2f}")


if __name__ == "__main__":
    main()
