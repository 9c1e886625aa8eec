"""PPO end to end on a micro model: the reward rises on held-out prompts while the KL to the
reference stays bounded; resuming reproduces the uninterrupted run (running score statistics and
evaluations included); the score transforms (LLaMA-2's whitening, TRL's running normalisation and
reward whitening, the missing-EOS penalty) against hand-computed values; the held-out evaluation
against a recomputation; bad prompt files and settings."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from chat_data import write_jsonl
from safetensors.torch import load_file

from lmforge.align.losses import group_advantages
from lmforge.align.ppo import PPOConfig, PPOTrainer, load_policy, policy_outputs, ppo
from lmforge.align.ppo_config import PPOSettings
from lmforge.align.reward import RewardConfig, RewardScorer, train_reward
from lmforge.data.chat import Prompt, read_prompts
from lmforge.generate.engine import Engine
from lmforge.generate.sampling import SamplingParams
from lmforge.io import RecordError
from lmforge.peft.adapters import load_with_adapter
from lmforge.peft.lora import disable_adapters
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


def test_ppo_raises_the_reward_with_bounded_kl(setup, sharp_base):
    root, train, heldout, scorer, tokenizer = setup
    config = recipe(root / "whole", sharp_base, train, 24)
    before = mean_score(load_policy(sharp_base, config.adapter)[0], tokenizer, scorer, heldout)
    adapter = ppo(config, scorer=scorer)
    after = mean_score(load_with_adapter(adapter, dtype=torch.float32), tokenizer, scorer, heldout)
    records = [json.loads(line) for line in (root / "whole" / "out" / "metrics.jsonl").read_text().splitlines()]
    print(f"held-out mean reward {before:.3f} -> {after:.3f}; KL per response {[round(r['kl'], 2) for r in records]}")
    assert after > before + 0.04
    assert max(r["kl"] for r in records) < 2 * config.ppo.target_kl  # the adaptive controller's bound
    assert {"policy_loss", "value_loss", "clip_fraction", "entropy", "response_length", "samples"} <= set(records[0])
    assert all(r["kl_k3"] >= 0 for r in records)  # k1 ("kl") may dip below 0; k3 cannot
    report = (root / "whole" / "out" / "report.md").read_text()
    assert "![training curve](reward.png)" in report and (root / "whole" / "out" / "reward.png").is_file()
    assert f"reward {records[-1]['reward']:.4g}" in report
    assert f"(score {records[-1]['samples'][0]['score']:.3f})" in report


def test_resuming_reproduces_the_run_with_running_score_statistics_and_evaluations(setup, sharp_base):
    """Killed after the checkpoint of iteration 4 (its iteration-8 checkpoint deleted), the resumed run
    ends where the uninterrupted one did: adapter, running score statistics and held-out evaluations."""
    root, train, heldout, scorer, _ = setup
    config = recipe(root / "resume", sharp_base, train, 8)
    config.ppo.use_score_scaling = config.ppo.use_score_norm = True
    config.ppo.eval_every = 4
    config.eval_prompts = write_jsonl(root / "eval.jsonl", [{"prompt": q} for q in heldout[:8]])
    adapter = ppo(config, scorer=scorer)
    out = root / "resume" / "out"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if {"eval_reward_sampled", "eval_reward_greedy", "eval_kl"} <= set(r)] == [4, 8]
    moments = torch.load(out / "checkpoints" / "step-000008" / "trainer_state.pt")["score_moments"]
    assert moments["count"] == 8 * 32

    shutil.rmtree(out / "checkpoints" / "step-000008")
    shutil.move(adapter, root / "uninterrupted")
    ppo(config, scorer=scorer, resume=True)
    a = load_file(root / "uninterrupted" / "adapter_model.safetensors")
    b = load_file(adapter / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert torch.load(out / "checkpoints" / "step-000008" / "trainer_state.pt")["score_moments"] == moments
    resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for key in ("reward", "kl", "eval_reward_sampled", "eval_reward_greedy", "eval_kl"):
        assert resumed[-1][key] == pytest.approx(records[-1][key], abs=1e-5)


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
    config.ppo = config.ppo.model_copy(update=SCORE_PLAIN)
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
    # the penalty reaches the cut responses only: every token's advantage is its response's score
    penalised = torch.tensor([-2.0 if i in cut else 0.0 for i in range(len(generated))])
    torch.testing.assert_close(rollout.advantages, penalised[:, None] * rollout.mask)


# Settings under which each response token's advantage is the (transformed) score of its response:
# no KL penalty (beta 0), undiscounted GAE with lambda 1 from the zero-initialised value head, no
# whitening of the advantages.
SCORE_PLAIN = {"init_kl_coef": 0.0, "adaptive_kl": False, "gamma": 1.0, "lam": 1.0, "whiten_advantages": False}


class QueuedScorer:
    """Returns the given batches of scores, one per call, whatever the sequences."""

    def __init__(self, *batches: list[float]) -> None:
        self.batches = list(batches)

    def score_ids(self, sequences: list[list[int]]) -> torch.Tensor:
        scores = torch.tensor(self.batches.pop(0))
        assert len(scores) == len(sequences)
        return scores


def two_token_trainer(root: Path, base: Path, train: Path, tokenizer, scorer, safety=None, **settings) -> PPOTrainer:
    """A trainer on four prompts per rollout whose responses are all two tokens long (stop tokens
    masked before that), with `SCORE_PLAIN` and `settings`."""
    config = recipe(root, base, train, 2)
    config.ppo = PPOSettings.model_validate({**config.ppo.model_dump(), **SCORE_PLAIN, "batch_size": 4,
                                             "sampling": {"max_new_tokens": 2, "min_tokens": 2}, **settings})
    policy, _ = load_policy(base, config.adapter)
    return PPOTrainer(config, policy, tokenizer, scorer, read_prompts(train), safety=safety)


def response_advantages(trainer: PPOTrainer) -> torch.Tensor:
    """One rollout's advantages at the response tokens, (4, 2), the iteration counted on."""
    rollout = trainer.rollout(trainer.batch_indices())
    trainer.iteration += 1
    assert rollout.mask.sum(1).tolist() == [2.0] * 4
    return rollout.advantages[rollout.mask.bool()].view(4, 2)


def test_running_score_normalisation_by_hand(setup, sharp_base):
    """TRL's use_score_scaling + use_score_norm: scores less the running mean over the running sample
    standard deviation of every score so far, this rollout's included."""
    root, train, _, _, tokenizer = setup
    scorer = QueuedScorer([1.0, 2.0, 3.0, 4.0], [10.0, 0.0, 5.0, 5.0])
    trainer = two_token_trainer(root / "running", sharp_base, train, tokenizer, scorer,
                                use_score_scaling=True, use_score_norm=True)
    # first rollout: mean 2.5, squared deviations 5 over 3 degrees of freedom
    expected = (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / math.sqrt(5 / 3)
    torch.testing.assert_close(response_advantages(trainer), expected[:, None].expand(4, 2))
    # both: mean 30 / 8 = 3.75, squared deviations 180 - 8 * 3.75^2 = 67.5 over 7
    expected = (torch.tensor([10.0, 0.0, 5.0, 5.0]) - 3.75) / math.sqrt(67.5 / 7)
    torch.testing.assert_close(response_advantages(trainer), expected[:, None].expand(4, 2))
    assert trainer.score_moments.state_dict() == {"count": 8, "mean": 3.75, "m2": 67.5}

    scaled = two_token_trainer(root / "scaled", sharp_base, train, tokenizer, QueuedScorer([1.0, 2.0, 3.0, 4.0]),
                               use_score_scaling=True)
    expected = torch.tensor([1.0, 2.0, 3.0, 4.0]) / math.sqrt(5 / 3)  # scaled, not centred
    torch.testing.assert_close(response_advantages(scaled), expected[:, None].expand(4, 2))


def test_llama2_whitened_combined_scores_by_hand(setup, sharp_base):
    """LLaMA-2's R = WHITEN(LOGIT(R_c)): R_c the safety score on a risky prompt or an unsafe-looking
    reply (sigmoid(safety) < 0.15), else the helpfulness score; LOGIT undoes the sigmoid of the
    reward models' linear scores, which the scorers return as they are; WHITEN over the rollout."""
    root, train, _, _, tokenizer = setup
    helpful, safety = QueuedScorer([1.0, 2.0, 3.0, 4.0]), QueuedScorer([0.5, -3.0, 2.0, 1.0])
    trainer = two_token_trainer(root / "llama2", sharp_base, train, tokenizer, helpful, safety=safety,
                                whiten_scores=True)
    for row, i in enumerate(trainer.batch_indices()):  # the third row's prompt is risky
        trainer.prompts[i] = Prompt(trainer.prompts[i].messages, risky=row == 2)
    # R_c = [1 (helpful), -3 (sigmoid(-3) = 0.047 < 0.15), 2 (risky), 4]: mean 1, variance 26 / 4
    expected = (torch.tensor([1.0, -3.0, 2.0, 4.0]) - 1.0) / math.sqrt(6.5)
    torch.testing.assert_close(response_advantages(trainer), expected[:, None].expand(4, 2))


def test_whitened_rewards_by_hand(setup, sharp_base):
    """TRL's whiten_rewards: the per-token rewards (0 at each first token, the score at each second)
    scaled to unit variance over the rollout's response tokens, their mean kept, before GAE."""
    root, train, _, _, tokenizer = setup
    trainer = two_token_trainer(root / "whiten-rewards", sharp_base, train, tokenizer,
                                QueuedScorer([1.0, 2.0, 3.0, 4.0]), whiten_rewards=True)
    # rewards 0, 1, 0, 2, 0, 3, 0, 4: mean 1.25, variance 30 / 8 - 1.25^2 = 2.1875
    whitened = (torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0], [0.0, 4.0]]) - 1.25) / math.sqrt(2.1875) + 1.25
    expected = torch.stack([whitened.sum(1), whitened[:, 1]], 1)  # lambda 1: each token's reward-to-go
    torch.testing.assert_close(response_advantages(trainer), expected)


def test_eval_metrics_equal_a_recomputation(setup, sharp_base):
    """After one iteration: the held-out greedy and sampled replies scored by the reward model
    directly, and the KL of the sampled replies from teacher-forced passes of policy and reference."""
    root, train, heldout, scorer, tokenizer = setup
    config = recipe(root / "eval", sharp_base, train, 1)
    config.ppo.sampling = config.ppo.sampling.model_copy(update={"max_new_tokens": 3})
    policy, _ = load_policy(sharp_base, config.adapter)
    eval_prompts = [Prompt([{"role": "user", "content": q}]) for q in heldout[:8]]
    trainer = PPOTrainer(config, policy, tokenizer, scorer, read_prompts(train), eval_prompts=eval_prompts)
    trainer.run()
    record = trainer.run_dir.records()[-1]

    im_end = tokenizer.token_to_id("<|im_end|>")
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(p.messages, add_generation_prompt=True))
               for p in eval_prompts]
    engine = Engine(policy)
    greedy = engine.generate(prompts, SamplingParams(max_new_tokens=3, temperature=0.0, stop_token_ids=[im_end]))
    sampled = engine.generate(prompts, SamplingParams(max_new_tokens=3, temperature=1.0, seed=config.ppo.seed,
                                                      stop_token_ids=[im_end]))
    for key, responses in (("eval_reward_greedy", greedy), ("eval_reward_sampled", sampled)):
        scores = scorer.score_ids([closed(p + r, im_end) for p, r in zip(prompts, responses)])
        assert record[key] == pytest.approx(float(scores.mean()), abs=1e-6)
    kl = []
    with torch.no_grad():
        for p, r in zip(prompts, sampled):
            ids = torch.tensor([p + r])
            logprobs = policy_outputs(policy, trainer.head, ids)[0][0, len(p) - 1 :]
            with disable_adapters(policy):
                reference = policy_outputs(policy, trainer.head, ids)[0][0, len(p) - 1 :]
            kl.append(float((logprobs - reference).sum()))
    assert abs(sum(kl)) / len(kl) > 1e-3  # one update moved the policy
    assert record["eval_kl"] == pytest.approx(sum(kl) / len(kl), abs=1e-3)


def test_bad_settings_name_their_fields():
    with pytest.raises(ValueError, match="use_score_norm"):
        PPOSettings(use_score_norm=True)
    with pytest.raises(ValueError, match="whiten_scores and use_score_scaling"):
        PPOSettings(whiten_scores=True, use_score_scaling=True)
    with pytest.raises(ValueError, match="whiten_rewards"):
        PPOSettings(whiten_rewards=True, estimator="grpo")
    with pytest.raises(ValueError, match="init_kl_coef 0.0 is outside"):
        PPOSettings(init_kl_coef=0.0)
    assert PPOSettings(init_kl_coef=0.0, adaptive_kl=False).init_kl_coef == 0.0
    with pytest.raises(ValueError, match="min_kl_coef 2.0 is above max_kl_coef 1.0"):
        PPOSettings(min_kl_coef=2.0)


def test_bad_prompt_files(tmp_path):
    bad = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"question": "?"}])
    with pytest.raises(RecordError, match=r"p.jsonl:2: field 'prompt'"):
        read_prompts(bad)
    empty = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "   "}])
    with pytest.raises(RecordError, match="e.jsonl:1: field 'prompt': empty"):
        read_prompts(empty)
