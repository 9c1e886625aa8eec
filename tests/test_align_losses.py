"""Alignment losses and advantages against hand-computed values, padded rows included."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.align.losses import (
    group_advantages, kl_k3,
    AdaptiveKLController, RunningMoments, bradley_terry_loss, dpo_loss, gae, masked_mean, ppo_policy_loss,
    ppo_value_loss, sequence_logprobs, whiten,
)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_bradley_terry_with_and_without_margin():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(-(logsig(1) + logsig(-1)) / 2)
    margin = torch.tensor([1.0, 0.5])
    assert bradley_terry_loss(chosen, rejected, margin).item() == pytest.approx(-(logsig(0) + logsig(-1.5)) / 2)


def test_dpo_hand_case_and_label_smoothing():
    loss, chosen, rejected = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]),
                                      torch.tensor([-2.0]), beta=0.5)
    assert (chosen.item(), rejected.item()) == (0.5, -0.5)
    assert loss.item() == pytest.approx(-logsig(1.0))
    smooth, _, _ = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]),
                            beta=0.5, label_smoothing=0.1)
    assert smooth.item() == pytest.approx(-0.9 * logsig(1.0) - 0.1 * logsig(-1.0))


def test_dpo_variants_by_hand_with_unequal_lengths():
    # log-ratios: chosen [1, -1], rejected [-1, 2]; per token: chosen [1/2, -1/3], rejected [-1/4, 2]
    logps = dict(policy_chosen=torch.tensor([-4.0, -9.0]), policy_rejected=torch.tensor([-6.0, -5.0]),
                 ref_chosen=torch.tensor([-5.0, -8.0]), ref_rejected=torch.tensor([-5.0, -7.0]),
                 chosen_tokens=torch.tensor([2.0, 3.0]), rejected_tokens=torch.tensor([4.0, 1.0]), beta=0.5)
    per_token = [0.5 + 0.25, -1 / 3 - 2.0]
    expected = {
        "sigmoid": -(logsig(0.5 * 2) + logsig(0.5 * -3)) / 2,
        "sigmoid_norm": -(logsig(0.5 * per_token[0]) + logsig(0.5 * per_token[1])) / 2,
        "ipo": ((per_token[0] - 1) ** 2 + (per_token[1] - 1) ** 2) / 2,  # 1 / (2 beta) = 1
    }
    for loss_type, value in expected.items():
        loss, chosen, rejected = dpo_loss(**logps, loss_type=loss_type)
        assert loss.item() == pytest.approx(value, rel=1e-6), loss_type
        # the implicit rewards are beta x the summed log-ratios whatever the loss
        assert chosen.tolist() == [0.5, -0.5] and rejected.tolist() == [-0.5, 1.0]
    smooth, _, _ = dpo_loss(**logps, loss_type="sigmoid_norm", label_smoothing=0.2)
    assert smooth.item() == pytest.approx(sum(-0.8 * logsig(0.5 * z) - 0.2 * logsig(-0.5 * z) for z in per_token) / 2)
    with pytest.raises(ValueError, match="'ipo' needs the response token counts"):
        dpo_loss(*list(logps.values())[:4], loss_type="ipo")
    with pytest.raises(ValueError, match="not 'ipo'"):
        dpo_loss(**logps, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="unknown loss_type 'kto'; expected one of sigmoid, ipo, sigmoid_norm"):
        dpo_loss(**logps, loss_type="kto")


def test_sequence_logprobs_sum_only_the_masked_tokens():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    labels = torch.tensor([[0, 1, -100]])
    mask = torch.tensor([[1, 1, 0]])
    assert sequence_logprobs(logits, labels, mask).item() == pytest.approx(math.log(0.5) + math.log(0.8))


def test_gae_hand_case_with_padding():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0, 9.0]])  # padding values must not leak in
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[0.225, 0.25, 0.3, 0.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.725, 0.85, 1.0, 0.0, 0.0]]))
    alone, _ = gae(rewards[:, :3], values[:, :3], mask[:, :3], gamma=1.0, lam=0.5)
    torch.testing.assert_close(advantages[:, :3], alone)
    discounted, _ = gae(rewards[:, :3], values[:, :3], mask[:, :3], gamma=0.9, lam=1.0)
    # lam = 1: advantage = discounted return - value
    expected = torch.tensor([[0.81 - 0.5, 0.9 - 0.6, 1.0 - 0.7]])
    torch.testing.assert_close(discounted, expected)


def test_whitening_uses_masked_entries_only():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    w = whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_mean(w ** 2, mask).item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(w[0, :3], torch.tensor([-1.0, 0.0, 1.0]) * math.sqrt(1.5), rtol=1e-4, atol=1e-4)


def test_ppo_clipped_surrogate_hand_case():
    ratio = torch.tensor([[1.5, 0.5, 1.0, 7.0]])
    old = torch.zeros_like(ratio)
    advantages = torch.tensor([[1.0, 1.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clip_fraction = ppo_policy_loss(ratio.log(), old, advantages, mask, clip=0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.0) / 3)
    assert clip_fraction.item() == pytest.approx(1 / 3)


def test_value_clipping_hand_case():
    values, old, returns = torch.tensor([[1.0, 0.6]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[2.0, 0.0]])
    mask = torch.tensor([[1, 1]])
    # token 0: clipped 0.7 -> max(1, 1.69); token 1: within the clip -> max(0.36, 0.36)
    assert ppo_value_loss(values, old, returns, mask, clip=0.2).item() == pytest.approx(0.5 * (1.69 + 0.36) / 2)


def test_adaptive_kl_controller_moves_towards_target():
    controller = AdaptiveKLController(beta=0.1, target=6.0, horizon=100)
    assert controller.update(kl=12.0, samples=10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert controller.update(kl=3.0, samples=10) == pytest.approx(0.1 * 1.02 * (1 - 0.2 * 0.1))  # error clipped


def test_adaptive_kl_controller_stays_within_its_bounds():
    # 64 samples against a horizon of 10: the step 1 - 0.2 * 6.4 = -0.28 would make beta negative
    controller = AdaptiveKLController(beta=0.1, target=1.0, horizon=10, bounds=(0.01, 1.0))
    assert controller.update(kl=0.0, samples=64) == 0.01
    assert controller.update(kl=0.0, samples=1) == 0.01
    # far above the target: 0.01 * (1 + 0.2 * 6.4) = 0.0228, then x2.28 per update until capped at 1
    assert controller.update(kl=5.0, samples=64) == pytest.approx(0.0228)
    assert [controller.update(kl=5.0, samples=64) for _ in range(5)][-1] == 1.0


def test_running_moments_after_known_batches():
    moments = RunningMoments()
    moments.update(torch.tensor([5.0]))
    assert (moments.mean, moments.std) == (5.0, 1.0)  # one value: no spread yet, so no scaling
    moments = RunningMoments()
    moments.update(torch.tensor([1.0, 2.0, 3.0]))
    assert (moments.mean, moments.std) == (pytest.approx(2.0), pytest.approx(1.0))  # sample variance 2 / 2
    moments.update(torch.tensor([4.0]))
    moments.update(torch.tensor([10.0, 0.0]))
    # all six: mean 20 / 6; squared deviations 130 - 6 * (10 / 3)^2 = 190 / 3 over 5 degrees of freedom
    assert moments.mean == pytest.approx(10 / 3, rel=1e-12)
    assert moments.std == pytest.approx(math.sqrt(38 / 3), rel=1e-12)
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    restored.update(torch.tensor([-1.0]))
    moments.update(torch.tensor([-1.0]))
    assert restored.state_dict() == moments.state_dict()
    # seven values: sum 19, sum of squares 131
    assert (moments.mean, moments.std) == (pytest.approx(19 / 7), pytest.approx(math.sqrt((131 - 19**2 / 7) / 6)))


def test_group_advantages_hand_case():
    scores = torch.tensor([1.0, 3.0, 2.0, 2.0, 5.0, 5.0])  # three prompts, two samples each
    std = math.sqrt(2.0)  # sample standard deviation of (1, 3)
    expected = torch.tensor([-1 / std, 1 / std, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(scores, 2), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(scores, 4)


def test_k3_kl_estimate_hand_case():
    logprobs, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.0, -1.0, -1.5])
    expected = [0.0, math.exp(1.0) - 1.0 - 1.0, math.exp(-1.0) + 1.0 - 1.0]
    assert kl_k3(logprobs, ref).tolist() == pytest.approx(expected)
