"""PPO end to end on a micro model: the reward rises on held-out prompts while the KL to the
reference stays bounded; resuming reproduces the uninterrupted run; bad prompt files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from chat_data import write_jsonl
from safetensors.torch import load_file

from lmforge.align.losses import group_advantages
from lmforge.align.ppo import PPOConfig, PPOTrainer, load_policy, policy_outputs, ppo
from lmforge.align.reward import RewardConfig, RewardScorer, train_reward
from lmforge.data.chat import read_prompts
from lmforge.generate.engine import Engine
from lmforge.generate.sampling import SamplingParams
from lmforge.io import RecordError
from lmforge.peft.adapters import load_with_adapter
from lmforge.tokenizer import Tokenizer
from lmforge.world.documents import questions
from lmforge.world.people import make_world
from lmforge.world.preferences import write_preference_data
from lmforge.world.safety import red_team_prompts


class IdScorer:
    """A reward model stand-in with a known optimum and a dense signal: the mean token id of the
    response (without the end-of-turn marker `end` that closes it) over the vocabulary size (higher
    ids are better)."""

    def __init__(self, prompt_lengths: dict[tuple[int, ...], int], vocab: int, end: int) -> None:
        self.prompt_lengths, self.vocab, self.end = prompt_lengths, vocab, end

    def score_ids(self, sequences: list[list[int]]) -> torch.Tensor:
        scores = []
        for seq in sequences:
            n = next(n for p, n in self.prompt_lengths.items() if tuple(seq[: len(p)]) == p)
            response = seq[n:-1] if seq[-1] == self.end else seq[n:]
            scores.append(sum(response) / max(1, len(response)) / self.vocab)
        return torch.tensor(scores)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, sharp_base):
    chat_base = sharp_base
    root = tmp_path_factory.mktemp("ppo")
    world = make_world(0, n_people=20, n_companies=4)
    train = write_jsonl(root / "prompts.jsonl", [{"prompt": q.question} for q in questions(world, "train")[:24]])
    heldout = [q.question for q in questions(world, "heldout")]
    tokenizer = Tokenizer.from_dir(chat_base)
    prompts = {tuple(tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                                    add_generation_prompt=True))): 0
               for q in [p.messages[0]["content"] for p in read_prompts(train)] + heldout}
    prompts = {p: len(p) for p in prompts}
    return root, train, heldout, IdScorer(prompts, tokenizer.vocab_size, tokenizer.token_to_id("<|im_end|>")), tokenizer


def recipe(root: Path, base: Path, prompts: Path, iterations: int) -> PPOConfig:
    return PPOConfig.model_validate({
        "out_dir": str(root / "out"), "policy": str(base), "reward": str(root / "unused"), "prompts": str(prompts),
        "adapter": {"method": "lora", "r": 8, "alpha": 16, "targets": "all-linear"},
        "ppo": {"iterations": iterations, "batch_size": 32, "mini_batch_size": 16, "ppo_epochs": 4, "lr": 1e-3,
                "sampling": {"max_new_tokens": 2}, "init_kl_coef": 0.02, "target_kl": 1.0, "save_every": 4,
                "keep_last": 10},
    })


def closed(sequence: list[int], end: int) -> list[int]:
    """A prompt + response as PPO scores it: with the end-of-turn marker `end` if the response was cut."""
    return sequence if sequence[-1] == end else sequence + [end]


def finished(rollout) -> list[list[int]]:
    """Each rollout row's prompt + response ids, padding dropped."""
    return [row[: int(m.nonzero().max()) + 2].tolist() for row, m in zip(rollout.ids, rollout.mask)]


def mean_score(model, tokenizer, scorer, questions_: list[str], seed: int = 0, new_tokens: int = 2) -> float:
    """The mean score of 8 replies sampled per question, each closed with `<|im_end|>` as PPO scores them."""
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                              add_generation_prompt=True)) for q in questions_]
    im_end = tokenizer.token_to_id("<|im_end|>")
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=seed, stop_token_ids=[im_end])
    responses = Engine(model).generate(prompts * 8, params)
    return float(scorer.score_ids([closed(p + r, im_end) for p, r in zip(prompts * 8, responses)]).mean())


def test_ppo_raises_the_reward_with_bounded_kl_and_resumes_exactly(setup, sharp_base):
    chat_base = sharp_base
    root, train, heldout, scorer, tokenizer = setup
    config = recipe(root / "whole", chat_base, train, 24)
    before = mean_score(load_policy(chat_base, config.adapter)[0], tokenizer, scorer, heldout)
    adapter = ppo(config, scorer=scorer)
    tuned = load_with_adapter(adapter, dtype=torch.float32)
    after = mean_score(tuned, tokenizer, scorer, heldout)
    records = [json.loads(line) for line in (root / "whole" / "out" / "metrics.jsonl").read_text().splitlines()]
    print(f"held-out mean reward {before:.3f} -> {after:.3f}; KL per response {[round(r['kl'], 2) for r in records]}")
    assert after > before + 0.04
    assert max(r["kl"] for r in records) < 2 * config.ppo.target_kl  # the adaptive controller's bound
    assert {"policy_loss", "value_loss", "clip_fraction", "entropy", "response_length", "samples"} <= set(records[0])
    report = (root / "whole" / "out" / "report.md").read_text()
    assert "![training curve](reward.png)" in report and (root / "whole" / "out" / "reward.png").is_file()
    assert f"reward {records[-1]['reward']:.4g}" in report
    assert f"(score {records[-1]['samples'][0]['score']:.3f})" in report

    out = root / "whole" / "out"
    shutil.rmtree(out / "checkpoints" / "step-000024")
    shutil.move(adapter, root / "uninterrupted")
    ppo(config, scorer=scorer, resume=True)
    a, b = load_file(root / "uninterrupted" / "adapter_model.safetensors"), load_file(adapter / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_grpo_raises_the_reward_with_group_advantages(setup, sharp_base):
    """GRPO (no value model): each prompt sampled four times, advantages relative to the group."""
    root, train, heldout, scorer, tokenizer = setup
    config = recipe(root / "grpo", sharp_base, train, 16)
    config.ppo.estimator, config.ppo.group_size, config.ppo.batch_size = "grpo", 4, 8
    policy, _ = load_policy(sharp_base, config.adapter)
    trainer = PPOTrainer(config, policy, tokenizer, scorer, read_prompts(train))
    indices = trainer.batch_indices()
    assert len(indices) == 32 and all(len(set(indices[i : i + 4])) == 1 for i in range(0, 32, 4))
    rollout = trainer.rollout(indices)
    # every response token carries its sequence's score relative to the other samples of its prompt
    im_end = tokenizer.token_to_id("<|im_end|>")
    expected = group_advantages(scorer.score_ids([closed(seq, im_end) for seq in finished(rollout)]).float(), 4)
    torch.testing.assert_close(rollout.advantages, expected[:, None] * rollout.mask)

    before = mean_score(load_policy(sharp_base, config.adapter)[0], tokenizer, scorer, heldout)
    adapter = ppo(config, scorer=scorer)
    after = mean_score(load_with_adapter(adapter, dtype=torch.float32), tokenizer, scorer, heldout)
    records = [json.loads(line) for line in (root / "grpo" / "out" / "metrics.jsonl").read_text().splitlines()]
    print(f"GRPO held-out mean reward {before:.3f} -> {after:.3f}; KL {[round(r['kl'], 2) for r in records]}")
    assert after > before + 0.03
    assert max(r["kl"] for r in records) < 2 * config.ppo.target_kl
    assert "kl_loss" in records[0] and "value_loss" not in records[0]


def test_ppo_raises_a_world_reward_models_score_on_held_out_prompts(tmp_path, sharp_base):
    """A reward model trained on the world's preference pairs, then PPO against it (with LLaMA-2's
    safety combination on the red-team prompts): held-out prompts' sampled replies score higher."""
    world = make_world(0, n_people=20, n_companies=4)
    pairs = write_preference_data(world, tmp_path / "pairs.jsonl", "train")
    reward = train_reward(RewardConfig.model_validate({
        "out_dir": str(tmp_path / "rm"), "base": str(sharp_base),
        "data": {"train_path": str(pairs), "max_len": 128, "val_fraction": 0.1},
        "train": {"steps": 30, "micro_batch_size": 16, "lr": 1e-3, "warmup_steps": 3, "save_every": 30,
                  "eval_every": 30, "log_every": 10}}))
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"prompt": q.question} for q in questions(world, "train")[:48]] +
                          [{"prompt": r.prompt, "risky": r.risky} for r in red_team_prompts(world, "train")])
    config = recipe(tmp_path, sharp_base, prompts, 32)
    config.reward = config.safety_reward = reward
    config.ppo.sampling = config.ppo.sampling.model_copy(update={"max_new_tokens": 4})
    # This reward model's scores move steeply under 4-token replies: with the recipe's beta 0.02 the KL per
    # response reached 2.3; 0.3 holds it near target (measured max 1.3).
    config.ppo.init_kl_coef = 0.3
    heldout = [q.question for q in questions(world, "heldout")] + [r.prompt for r in red_team_prompts(world, "heldout")]
    scorer, tokenizer = RewardScorer.load(reward), Tokenizer.from_dir(sharp_base)
    before = mean_score(load_policy(sharp_base, config.adapter)[0], tokenizer, scorer, heldout, new_tokens=4)
    after = mean_score(load_with_adapter(ppo(config), dtype=torch.float32), tokenizer, scorer, heldout, new_tokens=4)
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    print(f"held-out reward-model score {before:.3f} -> {after:.3f}; KL {[round(r['kl'], 2) for r in records]}; "
          f"reward {[round(r['reward'], 2) for r in records]}")
    assert after > before
    assert max(r["kl"] for r in records) < 2 * config.ppo.target_kl


def test_reference_is_the_policy_with_adapters_disabled(setup, sharp_base):
    chat_base = sharp_base
    root, train, _, scorer, tokenizer = setup
    config = recipe(root / "ref", chat_base, train, 1)
    policy, _ = load_policy(chat_base, config.adapter)
    trainer = PPOTrainer(config, policy, tokenizer, scorer, read_prompts(train))
    rollout = trainer.rollout(trainer.batch_indices())
    # At the start the LoRA update is zero: the policy equals the reference, so the KL is zero.
    assert rollout.stats["kl"] == pytest.approx(0.0, abs=1e-5)
    assert rollout.mask.sum(1).tolist() == [float(n) for n in rollout.mask.sum(1).tolist()]
    assert (rollout.advantages * (1 - rollout.mask)).abs().max() == 0


def test_rollout_keeps_the_log_probs_and_values_of_a_full_forward_pass(setup, sharp_base):
    """The rollout reads old log-probs and values off the generating forward passes (KV cache,
    left-padded batch); they must equal a full forward over each finished sequence."""
    root, train, _, scorer, tokenizer = setup
    config = recipe(root / "sampled", sharp_base, train, 1)
    config.ppo.sampling = config.ppo.sampling.model_copy(update={"max_new_tokens": 6})
    policy, _ = load_policy(sharp_base, config.adapter)
    trainer = PPOTrainer(config, policy, tokenizer, scorer, read_prompts(train))
    with torch.no_grad():  # a non-zero adapter and value head, so that both paths matter
        generator = torch.Generator().manual_seed(0)
        for name, p in list(policy.named_parameters()) + list(trainer.head.named_parameters()):
            if "lora_B" in name or "proj" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    rollout = trainer.rollout(trainer.batch_indices())
    logprobs, values, _ = policy_outputs(policy, trainer.head, rollout.ids)
    mask = rollout.mask.bool()
    torch.testing.assert_close(rollout.old_logprobs[mask], logprobs[mask], atol=1e-4, rtol=0)
    torch.testing.assert_close(rollout.old_values[mask], values[mask], atol=1e-4, rtol=0)
    assert rollout.stats["kl"] > 0


def test_a_cut_response_is_scored_closed_with_the_end_of_turn_marker(setup, sharp_base):
    """The reward model reads its score at `<|im_end|>`, where training read it: a response cut at
    max_new_tokens is scored with the marker appended, less `missing_eos_penalty`; one that ended
    itself is scored as it is."""
    root, train, _, _, tokenizer = setup
    im_end = tokenizer.token_to_id("<|im_end|>")

    class Recorder:
        seen: list[list[int]] = []

        def score_ids(self, sequences: list[list[int]]) -> torch.Tensor:
            self.seen = sequences
            return torch.zeros(len(sequences))

    config = recipe(root / "closed", sharp_base, train, 1)
    config.ppo.sampling = config.ppo.sampling.model_copy(update={"max_new_tokens": 3})
    config.ppo.missing_eos_penalty = 2.0
    policy, _ = load_policy(sharp_base, config.adapter)
    trainer = PPOTrainer(config, policy, tokenizer, scorer := Recorder(), read_prompts(train))
    sample = trainer.sample

    def first_ends_itself(prompts, params):
        responses, logprobs, values = sample(prompts, params)
        return [responses[0][:1] + [im_end], *responses[1:]], logprobs, values

    trainer.sample = first_ends_itself
    rollout = trainer.rollout(trainer.batch_indices())
    generated = finished(rollout)
    assert generated[0][-1] == im_end and scorer.seen[0] == generated[0]
    cut = [i for i, seq in enumerate(generated) if seq[-1] != im_end]
    assert cut and all(scorer.seen[i] == generated[i] + [im_end] for i in cut)
    assert rollout.stats["reward"] == pytest.approx(-2.0 * len(cut) / len(generated))


def test_bad_prompt_files(tmp_path):
    bad = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"question": "?"}])
    with pytest.raises(RecordError, match=r"p.jsonl:2: field 'prompt'"):
        read_prompts(bad)
    empty = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "   "}])
    with pytest.raises(RecordError, match="e.jsonl:1: field 'prompt': empty"):
        read_prompts(empty)
