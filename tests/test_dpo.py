"""`lmforge dpo`: the loss against transformers' log-probs and the formula, precomputed reference
log-probs against on-the-fly ones, a rise in held-out preference accuracy on the built-in world,
exact resume from an adapter base, and bad data named by file and line."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from chat_data import write_jsonl
from safetensors.torch import load_file

from lmforge.align.dpo import (
    all_logprobs, collate_pairs, dpo_loss_fn, load_dpo_config, make_reference, pair_logprobs, preference_accuracy,
    train_dpo, validation,
)
from lmforge.checkpoint import load_model
from lmforge.data.chat import IGNORE
from lmforge.data.preference import encode_pair, read_pairs
from lmforge.peft.adapters import adapter_base, load_with_adapter, save_adapter
from lmforge.peft.lora import lora_layers
from lmforge.peft.method import AdapterConfig, apply_method
from lmforge.tokenizer import Tokenizer
from lmforge.train.sft import SFTConfig, sft
from lmforge.world.documents import write_instruction_data
from lmforge.world.people import make_world
from lmforge.world.preferences import write_preference_data

MAX_LEN = 128  # the micro model's context


@pytest.fixture(scope="module")
def world():
    return make_world(0, n_people=20, n_companies=4)


@pytest.fixture(scope="module")
def data(tmp_path_factory, world) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("prefs")
    return (write_preference_data(world, root / "train.jsonl", "train"),
            write_preference_data(world, root / "heldout.jsonl", "heldout"))


def lora_with_random_update(base: Path, seed: int = 0) -> torch.nn.Module:
    """The base with LoRA adapters whose B matrices are random (so the policy differs from the reference)."""
    model = apply_method(load_model(base), AdapterConfig(method="lora", r=4, alpha=8, targets="all-linear"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.2)
    return model


def recipe(tmp_path: Path, base: Path, data: tuple[Path, Path], method: str = "lora", **train) -> Path:
    settings = {"steps": 4, "micro_batch_size": 4, "grad_accum": 2, "lr": 1e-2, "warmup_steps": 1, "log_every": 1,
                "eval_every": 2, "save_every": 2, "keep_last": 10, **train}
    config = {"out_dir": str(tmp_path / "out"), "base": str(base), "beta": 0.1,
              "data": {"train_path": str(data[0]), "val_path": str(data[1]), "max_len": MAX_LEN},
              "adapter": {"method": method, "r": 4, "alpha": 8, "targets": "all-linear"}, "train": settings}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "dpo.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z))


def test_losses_equal_the_formulas_on_transformers_logprobs(tmp_path, chat_base, chat_tokenizer, data):
    """Each loss_type, with and without RPO's NLL, in training and in validation, against the formulas
    on transformers' log-probs; the NLL against F.cross_entropy of all chosen tokens."""
    import peft
    import transformers as tf

    pairs = [encode_pair(chat_tokenizer, p, MAX_LEN) for p in read_pairs(data[0])[:3]]
    policy = lora_with_random_update(chat_base)
    save_adapter(policy, tmp_path / "adapter", base=chat_base)
    hf_reference = tf.AutoModelForCausalLM.from_pretrained(chat_base).eval()
    hf_policy = peft.PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(chat_base),
                                               tmp_path / "adapter").eval()

    def logits_at_labels(hf, example) -> tuple[torch.Tensor, torch.Tensor]:  # one unpadded sequence
        with torch.no_grad():
            logits = hf(torch.tensor([example.input_ids])).logits[0].double()
        where = torch.tensor(example.labels) != IGNORE
        return logits[where], torch.tensor(example.labels)[where]

    def logprob(hf, example) -> tuple[float, int]:  # summed over the labelled positions, and their number
        logits, labels = logits_at_labels(hf, example)
        return float(logits.log_softmax(-1).gather(-1, labels[:, None]).sum()), len(labels)

    ratios = []  # per pair: (chosen log-ratio, its tokens, rejected log-ratio, its tokens)
    for p in pairs:
        (c, nc), (c_ref, _), (r, nr), (r_ref, _) = (logprob(hf, e) for e in (p.chosen, p.rejected)
                                                    for hf in (hf_policy, hf_reference))
        ratios.append((c - c_ref, nc, r - r_ref, nr))
    assert any(nc != nr for _, nc, _, nr in ratios)  # so averaging over tokens matters
    chosen = [logits_at_labels(hf_policy, p.chosen) for p in pairs]
    nll = float(torch.nn.functional.cross_entropy(torch.cat([x for x, _ in chosen]), torch.cat([y for _, y in chosen])))

    beta = 0.5
    margins = [beta * (c - r) for c, _, r, _ in ratios]
    assert min(abs(z) for z in margins) > 1e-2  # the adapters matter
    per_token = [c / nc - r / nr for c, nc, r, nr in ratios]
    variants = {  # loss_type, label_smoothing, rpo_alpha: the summed loss over the three pairs
        ("sigmoid", 0.1, None): sum(-0.9 * log_sigmoid(z) - 0.1 * log_sigmoid(-z) for z in margins),
        ("sigmoid_norm", 0.1, 0.5): sum(-0.9 * log_sigmoid(beta * m) - 0.1 * log_sigmoid(-beta * m)
                                        for m in per_token) + 0.5 * 3 * nll,
        ("ipo", 0.0, 1.0): sum((m - 1 / (2 * beta)) ** 2 for m in per_token) + 3 * nll,
    }
    pad = chat_tokenizer.pad_id
    reference = all_logprobs(make_reference(policy, None), pairs, 2, pad, torch.device("cpu"))
    with torch.no_grad():
        for (loss_type, smoothing, alpha), expected in variants.items():
            total, n, sums = dpo_loss_fn(beta, smoothing, make_reference(policy, None), loss_type, alpha)(
                policy, collate_pairs(pairs, pad))
            assert int(n) == 3
            assert float(total) == pytest.approx(expected, rel=1e-4), loss_type
            assert float(sums["reward_margin"]) == pytest.approx(sum(margins), abs=2e-4)
            assert float(sums["reward_accuracy"]) == sum(z > 0 for z in margins)
            assert float(sums["nll_loss"]) / 3 == pytest.approx(nll, rel=1e-5)

            # the same loss with the reference log-probs computed beforehand and carried in the batch
            batch = collate_pairs(pairs, pad, reference)
            total, _, _ = dpo_loss_fn(beta, smoothing, None, loss_type, alpha)(policy, batch)
            assert float(total) == pytest.approx(expected, rel=1e-4), loss_type

            # micro-batches of the batch add up to it (the loop divides by all pairs), NLL included
            loss_fn = dpo_loss_fn(beta, smoothing, None, loss_type, alpha)
            parts = [loss_fn(policy, {k: v[rows] for k, v in batch.items()}) for rows in (slice(0, 1), slice(1, 3))]
            assert sum(float(t) for t, _, _ in parts) == pytest.approx(float(total), rel=1e-6)
            assert sum(float(s["nll_loss"]) for _, _, s in parts) / 3 == pytest.approx(nll, rel=1e-5)

            # validation computes the same loss
            config = load_dpo_config(recipe(tmp_path, chat_base, data), [
                f"beta={beta}", f"loss_type={loss_type}", f"label_smoothing={smoothing}",
                f"rpo_alpha={'null' if alpha is None else alpha}"])
            held_out = validation(pairs, reference, config, pad, torch.device("cpu"))(policy)
            assert held_out["val_loss"] == pytest.approx(expected / 3, rel=1e-4), loss_type
            assert held_out["val_nll_loss"] == pytest.approx(nll, rel=1e-5)
    # the NLL is a mean over all chosen tokens, not a mean of the micro-batches' means
    tokens = [len(y) for _, y in chosen]
    token_nll = [float(torch.nn.functional.cross_entropy(x, y, reduction="sum")) for x, y in chosen]
    mean_of_means = (token_nll[0] / tokens[0] + 2 * sum(token_nll[1:]) / sum(tokens[1:])) / 3
    assert abs(mean_of_means - nll) > 1e-3


@pytest.mark.parametrize("method", ["lora", "full"])
def test_precomputed_reference_trains_like_the_reference_on_the_fly(tmp_path, chat_base, data, method):
    """Full fine-tuning without precomputation holds a frozen copy as the reference."""
    outputs, lr, steps = {}, 1e-2, 3
    for precompute in (True, False):
        path = recipe(tmp_path / str(precompute), chat_base, data, method, steps=steps, lr=lr, eval_every=steps,
                      save_every=steps)
        out = train_dpo(load_dpo_config(path, [f"precompute_reference={str(precompute).lower()}"]))
        weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
        outputs[precompute] = load_file(out / weights)
        outputs[precompute, "loss"] = [m["loss"] for m in metrics(out.parent) if "loss" in m]
    a, b = outputs[True], outputs[False]
    assert a.keys() == b.keys()
    # The two paths compute the reference log-probs in batches of different shapes, so they agree to
    # float32 rounding (~1e-7 relative), and so do the gradients. Adam divides each gradient by its own
    # size: where a gradient is itself as small as that rounding, the rounding decides its update, which
    # is still at most about lr per step. So nearly every weight agrees to 1e-4, and none by less than
    # Adam's bound of lr x steps; a wrong reference moves most weights by ~lr.
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    close = torch.cat([((a[k] - b[k]).abs() <= 1e-6 + 1e-4 * b[k].abs()).flatten() for k in a])
    print(f"{method}: {close.float().mean():.5f} of weights within 1e-4, largest difference {diff.max():.2e}")
    assert close.float().mean() >= 0.999 and diff.max() <= lr * steps
    assert outputs[True, "loss"] == pytest.approx(outputs[False, "loss"], rel=1e-4)
    changed = [k for k in a if "layers.0.self_attn.q_proj" in k and ("lora_B" in k or method == "full")]
    assert changed and all(a[k].abs().sum() > 0 for k in changed)


def test_dpo_raises_preference_accuracy_on_heldout_pairs(tmp_path, chat_base, world, data):
    """A briefly SFT'd micro model, then DPO with LoRA: the policy prefers the chosen response of more
    held-out pairs (held-out people) than the starting model does."""
    qa = write_instruction_data(world, tmp_path / "qa.jsonl", "train")
    sft_model = sft(SFTConfig.model_validate({
        "out_dir": str(tmp_path / "sft"), "base": str(chat_base), "adapter": {"method": "full"},
        "data": {"datasets": [{"path": str(qa)}], "max_len": MAX_LEN, "val_fraction": 0.0},
        "train": {"steps": 40, "micro_batch_size": 8, "lr": 1e-2, "warmup_steps": 2, "log_every": 10,
                  "save_every": 1000}}))
    path = recipe(tmp_path, sft_model, data, steps=200, micro_batch_size=8, grad_accum=1, eval_every=200,
                  save_every=200, log_every=10)
    adapter = train_dpo(load_dpo_config(path, ["beta=0.05"]))

    tokenizer = Tokenizer.from_dir(sft_model)
    pairs = [encode_pair(tokenizer, p, MAX_LEN) for p in read_pairs(data[1])]

    def accuracy(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return preference_accuracy(all_logprobs(lambda batch: pair_logprobs(model, batch), pairs, 8,
                                                    tokenizer.pad_id, torch.device("cpu")))

    before, after = accuracy(load_model(sft_model)), accuracy(load_with_adapter(adapter, merge=True))
    print(f"held-out preference accuracy over {len(pairs)} pairs: before DPO {before:.3f}, after {after:.3f}")
    assert after > before
    last = metrics(tmp_path / "out")[-1]
    assert last["val_reference_preference_accuracy"] == pytest.approx(before)
    assert last["val_preference_accuracy"] == pytest.approx(after)
    assert last["val_reward_accuracy"] > 0.5 and last["val_reward_margin"] > 0


def test_adapter_base_is_merged_and_resume_reproduces_the_run(tmp_path, chat_base, data):
    sft_adapter = tmp_path / "sft-adapter"
    save_adapter(lora_with_random_update(chat_base, seed=1), sft_adapter, base=chat_base)
    path = recipe(tmp_path, sft_adapter, data)
    adapter = train_dpo(load_dpo_config(path, []))
    out = tmp_path / "out"
    assert adapter_base(adapter) == (out / "base").resolve()
    ids = torch.tensor([[5, 17, 42, 9]])
    with torch.no_grad():
        torch.testing.assert_close(load_model(out / "base")(ids), load_with_adapter(sft_adapter, merge=True)(ids))
    logged = metrics(out)
    losses = [m["loss"] for m in logged if "loss" in m]
    for m in (m for m in logged if "loss" in m):  # means over the 8 pairs of a step's two micro-batches
        assert m["reward_margin"] == pytest.approx(m["chosen_reward"] - m["rejected_reward"], abs=1e-6)
        correct = m["reward_accuracy"] * 8
        assert 0 <= correct <= 8 and correct == pytest.approx(round(correct))
    assert {"val_loss", "val_reward_margin", "val_reward_accuracy", "val_preference_accuracy",
            "val_reference_preference_accuracy"} <= logged[-1].keys()

    # As if killed after the step-2 checkpoint: resuming reproduces the uninterrupted run exactly.
    shutil.rmtree(out / "checkpoints" / "step-000004")
    shutil.move(adapter, tmp_path / "uninterrupted")
    train_dpo(load_dpo_config(path, []), resume=True)
    a = load_file(tmp_path / "uninterrupted" / "adapter_model.safetensors")
    b = load_file(adapter / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in metrics(out) if "loss" in m] == losses


def test_rpo_logs_the_nll_and_keeps_the_chosen_likelihood(tmp_path, chat_base, data):
    """Ten LoRA steps from the same start with and without rpo_alpha. At the first step the policy is
    the reference, so DPO's loss is log 2 and the logged loss adds exactly the logged NLL; after
    training, the held-out chosen responses are likelier with RPO (seeds 0, 1, 2: NLL 5.87-5.89 against
    plain DPO's 6.03-6.05)."""
    runs = {}
    for alpha in ("null", "1.0"):
        path = recipe(tmp_path / alpha, chat_base, data, steps=10, eval_every=10, save_every=10)
        train_dpo(load_dpo_config(path, [f"rpo_alpha={alpha}"]))
        runs[alpha] = metrics(tmp_path / alpha / "out")
    plain, rpo = runs["null"], runs["1.0"]
    assert all("nll_loss" in m for m in plain + rpo if "loss" in m)
    assert plain[0]["nll_loss"] == pytest.approx(rpo[0]["nll_loss"], rel=1e-6) and rpo[0]["nll_loss"] > 1
    assert plain[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rpo[0]["loss"] == pytest.approx(math.log(2) + rpo[0]["nll_loss"], abs=1e-5)
    print(f"held-out NLL of the chosen responses: DPO {plain[-1]['val_nll_loss']:.4f}, "
          f"RPO {rpo[-1]['val_nll_loss']:.4f}")
    assert rpo[-1]["val_nll_loss"] < plain[-1]["val_nll_loss"] - 0.05


PROMPT = [{"role": "user", "content": "Where was Alice born?"}]


@pytest.mark.parametrize("record, where", [
    ({"prompt": PROMPT, "chosen": "", "rejected": "no"}, "field 'chosen': empty"),
    ({"prompt": PROMPT, "chosen": "Port Alder.", "rejected": "Port Alder."}, "field 'rejected': identical"),
    ({"prompt": "where " * 200, "chosen": "Port Alder.", "rejected": "No."}, "field 'prompt': "),
    ({"prompt": PROMPT, "chosen": "yes"}, "field 'rejected': missing"),
])
def test_bad_pairs_name_file_and_line(tmp_path, chat_base, data, record, where):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": PROMPT, "chosen": "Port Alder.", "rejected": "No."}, record])
    with pytest.raises(ValueError) as e:
        train_dpo(load_dpo_config(recipe(tmp_path, chat_base, data), [f"data.train_path={bad}"]))
    assert str(e.value).startswith(f"{bad}:2: {where}")


def test_bad_recipe_names_the_field(tmp_path, chat_base, data):
    load_dpo_config(Path(__file__).parents[1] / "configs" / "dpo-tiny.yaml", [])  # the shipped recipe
    path = recipe(tmp_path, chat_base, data)
    with pytest.raises(ValueError, match="beta: Input should be greater than 0"):
        load_dpo_config(path, ["beta=0"])
    with pytest.raises(ValueError, match="rpo_alpha: Input should be greater than or equal to 0"):
        load_dpo_config(path, ["rpo_alpha=-0.5"])
    with pytest.raises(ValueError, match="loss_type: Input should be 'sigmoid', 'ipo' or 'sigmoid_norm'"):
        load_dpo_config(path, ["loss_type=kto"])
    with pytest.raises(ValueError, match="label_smoothing: conservative DPO smooths the logistic losses"):
        load_dpo_config(path, ["loss_type=ipo", "label_smoothing=0.1"])
    with pytest.raises(ValueError, match="no preference records of kind 'poetry'"):
        train_dpo(load_dpo_config(path, ["data.kind=poetry"]))
