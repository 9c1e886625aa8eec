"""`lmforge reward`: the sequence-classification format against transformers, the scorer's token
ids, LLaMA-2's combined reward, the Bradley–Terry stage (resume equals an uninterrupted run; bad
data names file and line) and held-out pairwise accuracy on the built-in world."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chat_data import write_jsonl

from lmforge.align.losses import bradley_terry_loss
from lmforge.align.reward import (
    RewardModel, RewardScorer, collate_pairs, combined_reward, load_pairs, load_reward_config, pad_right,
    pairwise_loss, train_reward,
)
from lmforge.checkpoint import load_model
from lmforge.data.preference import read_pairs
from lmforge.train.run_dir import RunDir
from lmforge.world.people import make_world
from lmforge.world.preferences import write_preference_data

PROMPT = [{"role": "user", "content": "Where was Alice Okafor born?"}]


def reward_model(path: Path, seed: int = 0) -> RewardModel:
    return RewardModel.from_lm(load_model(path), pad_token_id=0, seed=seed)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mixtral", "gpt2", "phi3", "falcon-new", "gemma3"])
def test_transformers_sequence_classifier_gives_our_scores(hf_checkpoint, tmp_path, family):
    import transformers

    _, path = hf_checkpoint(family)
    ours = reward_model(path)
    ours.save(tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["architectures"][0].endswith("ForSequenceClassification") and config["pad_token_id"] == 0
    assert "lm_head.weight" not in load_file(tmp_path / "rm" / "model.safetensors")

    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").float().eval()
    assert theirs.config.num_labels == 1
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(3, 97, (n,), generator=generator).tolist() for n in (9, 3, 6)]
    ids = pad_right(sequences, 0)
    with torch.no_grad():
        scores = ours(ids)
        hf_scores = theirs(ids, attention_mask=(ids != 0).long()).logits.squeeze(-1)
        alone = torch.cat([ours(torch.tensor([s])) for s in sequences])
        loaded = RewardModel.load(tmp_path / "rm")(ids)
    torch.testing.assert_close(hf_scores, scores, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(alone, scores, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loaded, scores, rtol=1e-6, atol=1e-6)
    assert scores.std() > 0.1  # the rows really differ, so a wrong position would show


def test_a_transformers_saved_classifier_loads(tmp_path):
    import transformers

    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, num_labels=1)
    torch.manual_seed(0)
    theirs = transformers.LlamaForSequenceClassification(config).eval()
    theirs.save_pretrained(tmp_path / "hf")
    ids = pad_right([[5, 6, 7, 8], [9, 10]], 0)
    with torch.no_grad():
        torch.testing.assert_close(RewardModel.load(tmp_path / "hf")(ids), theirs(ids).logits.squeeze(-1),
                                   rtol=1e-4, atol=1e-4)

    causal = {**config.to_dict(), "architectures": ["LlamaForCausalLM"]}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(causal))
    with pytest.raises(ValueError, match="no sequence classifier"):
        RewardModel.load(tmp_path / "hf")


def test_the_trunk_comes_from_the_base_and_the_head_is_small(chat_base):
    lm = load_model(chat_base)
    model = RewardModel.from_lm(load_model(chat_base), pad_token_id=2, seed=3)
    assert all(torch.equal(p, lm.model.state_dict()[k]) for k, p in model.model.state_dict().items())
    d = model.config.hidden_size
    assert model.score.weight.shape == (1, d) and not model.config.tie_word_embeddings
    assert 0.5 / math.sqrt(d + 1) < model.score.weight.std() < 1.5 / math.sqrt(d + 1)
    with pytest.raises(ValueError, match="pad_token_id"):
        RewardModel(lm.config.model_copy(update={"pad_token_id": None}))


def test_scorer_scores_what_the_policy_generates(chat_base, chat_tokenizer):
    tokenizer = chat_tokenizer
    scorer = RewardScorer(reward_model(chat_base), tokenizer, max_len=100)
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True))
    generated = tokenizer.encode("Alice Okafor was born in Vantor.") + [tokenizer.token_to_id("<|im_end|>")]
    assert scorer.encode(PROMPT, "Alice Okafor was born in Vantor.") == prompt_ids + generated

    responses = ["Alice Okafor was born in Vantor.", "I am not sure about that.", "Port Alder"]
    scores = scorer.score([PROMPT] * 3, responses, batch_size=2)
    one_by_one = [scorer.score([PROMPT], [r])[0] for r in responses]
    assert scores == pytest.approx(one_by_one, abs=1e-5) and len(set(scores)) == 3
    torch.testing.assert_close(scorer.score_ids([prompt_ids + generated]), torch.tensor(scores[:1]))
    with pytest.raises(ValueError, match="no room"):
        RewardScorer(scorer.model, tokenizer, max_len=len(prompt_ids)).score([PROMPT], ["x"])


def test_combined_reward_follows_llama2_by_hand():
    helpful = torch.tensor([1.0, 2.0, -0.5, 0.3])
    safety = torch.tensor([0.5, -3.0, 2.0, -1.0])
    risky = torch.tensor([True, False, False, False])
    # risky prompt -> safety; sigmoid(-3) = 0.047 < 0.15 -> safety; sigmoid(2), sigmoid(-1) = 0.27 -> helpful
    expected = torch.tensor([0.5, -3.0, -0.5, 0.3])
    torch.testing.assert_close(combined_reward(helpful, safety, risky), expected)
    assert combined_reward(helpful, safety, risky, threshold=0.3)[3] == -1.0  # 0.27 < 0.3 now
    # whitened: mean -0.675, population variance 1.941875
    std = math.sqrt(1.941875)
    torch.testing.assert_close(combined_reward(helpful, safety, risky, whitened=True),
                               torch.tensor([1.175, -2.325, 0.175, 0.975]) / std, rtol=1e-4, atol=1e-4)


def test_pairs_margins_kinds_and_the_loss(tmp_path, chat_base, chat_tokenizer):
    records = [
        {"prompt": "Where was Alice born?", "chosen": "Vantor.", "rejected": "I would rather not say.",
         "kind": "helpful", "margin": 2},
        {"prompt": "Her phone number?", "chosen": "I cannot share that.", "rejected": "555-0100-0000.",
         "kind": "safety"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", records)
    pairs = load_pairs(path, chat_tokenizer, 64, margin=0.5)
    assert [(p.margin, p.kind) for p in pairs] == [(2.0, "helpful"), (0.5, "safety")]
    assert [p.kind for p in load_pairs(path, chat_tokenizer, 64, kind="safety")] == ["safety"]
    with pytest.raises(ValueError, match="no records of kind 'harm'"):
        load_pairs(path, chat_tokenizer, 64, kind="harm")

    model = reward_model(chat_base)
    batch = collate_pairs(pairs, pad_id=0)
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape
    total, count, sums = pairwise_loss(model, batch)
    with torch.no_grad():
        chosen = torch.stack([model(torch.tensor([p.chosen]))[0] for p in pairs])
        rejected = torch.stack([model(torch.tensor([p.rejected]))[0] for p in pairs])
    expected = 2 * bradley_terry_loss(chosen, rejected, torch.tensor([2.0, 0.5]))
    assert count == 2 and total.item() == pytest.approx(expected.item(), abs=1e-5)
    assert sums["accuracy"] == (chosen > rejected).sum() and sums["margin"].item() == pytest.approx(
        (chosen - rejected).sum().item(), abs=1e-5)


# ---- the stage ---------------------------------------------------------------------------------


def recipe(tmp_path: Path, base: Path, steps: int, **train) -> Path:
    world = make_world(0, n_people=20, n_companies=4)
    data = write_preference_data(world, tmp_path / "pairs.jsonl", "train")
    settings = {"steps": steps, "micro_batch_size": 4, "grad_accum": 2, "lr": 1e-3, "warmup_steps": 1,
                "log_every": 1, "eval_every": 2, "save_every": 2, "keep_last": 10, **train}
    config = {"out_dir": str(tmp_path / "out"), "base": str(base), "margin": 0.5,
              "data": {"train_path": str(data), "max_len": 128, "val_fraction": 0.2}, "train": settings}
    path = tmp_path / "reward.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def metrics(out: Path) -> list[dict]:
    """The logged records without their timings."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def test_training_validates_and_resumes_exactly(tmp_path, chat_base):
    path = recipe(tmp_path, chat_base, 6)
    out = tmp_path / "out"
    model_dir = train_reward(load_reward_config(path, []))
    assert model_dir == out / "model" and (model_dir / "tokenizer.json").is_file()
    records = metrics(out)
    losses = [m["loss"] for m in records if "loss" in m]
    val = [m for m in records if "val_accuracy" in m]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert all(0 <= m["accuracy"] <= 1 and "margin" in m for m in records if "loss" in m)
    assert [m["step"] for m in val] == [2, 4, 6]
    assert all(0 <= m["val_accuracy"] <= 1 and "val_loss" in m and "val_accuracy_safety" in m for m in val)
    # the report's samples: held-out pairs with the saved model's scores, as transformers-layout loading gives them
    report = (out / "report.md").read_text()
    first = read_pairs(tmp_path / "pairs.jsonl")
    scorer = RewardScorer.load(model_dir)
    shown = [line for line in report.splitlines() if "| chosen (" in line]
    assert len(shown) == 4
    scores = [float(x) for x in re.findall(r"\(([+-]\d+\.\d+)\)", shown[0])]
    assert len(scores) == 2 and scores[0] != scores[1]
    assert any(abs(scorer.score([p.prompt], [p.chosen[0]["content"]])[0] - scores[0]) < 0.006 for p in first)

    # As if killed after the step-4 checkpoint: resuming reproduces the uninterrupted run exactly.
    shutil.rmtree(RunDir(out).checkpoints()[-1])
    shutil.move(model_dir, tmp_path / "uninterrupted")
    train_reward(load_reward_config(path, []), resume=True)
    a = load_file(tmp_path / "uninterrupted" / "model.safetensors")
    b = load_file(model_dir / "model.safetensors")
    assert a.keys() == b.keys() and "score.weight" in a and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(out) == records


@pytest.mark.parametrize("record, where", [
    ({"prompt": "hi", "chosen": "", "rejected": "no"}, "field 'chosen': empty"),
    ({"prompt": "hi", "chosen": "same", "rejected": "same"}, "field 'rejected': identical"),
    ({"prompt": "tell me " * 60, "chosen": "a", "rejected": "b"}, "field 'prompt': "),
    ({"prompt": "hi", "chosen": "tell me " * 60 + "a", "rejected": "tell me " * 60 + "b"},
     "field 'rejected': identical to 'chosen' within max_len 128"),
    ({"prompt": "hi", "chosen": "a", "rejected": "b", "margin": "big"}, "field 'margin': must be a number"),
])
def test_bad_pairs_name_file_and_line(tmp_path, chat_base, capsys, record, where):
    good = {"prompt": "hi", "chosen": "hello", "rejected": "go away"}
    bad = write_jsonl(tmp_path / "bad.jsonl", [good, good, record])
    config = load_reward_config(recipe(tmp_path, chat_base, 2), [f"data.train_path={bad}"])
    with pytest.raises(ValueError) as e:
        train_reward(config)
    assert str(e.value).startswith(f"{bad}:3: {where}")
    if "within max_len" in where:
        assert "1 of 3 pairs have a response cut to fit 128 tokens" in capsys.readouterr().out


def test_bad_recipes_name_the_field(tmp_path, chat_base):
    load_reward_config(Path(__file__).resolve().parents[1] / "configs" / "reward-tiny.yaml", [])
    path = recipe(tmp_path, chat_base, 2)
    with pytest.raises(ValueError, match="margin"):
        load_reward_config(path, ["margin=-1"])
    with pytest.raises(ValueError, match="data.kind"):
        load_reward_config(path, ["data.kind=[1]"])
    with pytest.raises(ValueError, match="no records of kind 'harm'"):
        train_reward(load_reward_config(path, ["data.kind=harm"]))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(ValueError, match="merge it first"):
        train_reward(load_reward_config(path, [f"base={adapter}"]))


# ---- held-out accuracy on the built-in world ---------------------------------------------------


def test_held_out_pairwise_accuracy_on_the_world(tmp_path, chat_base):
    """Train on the "train" people's pairs, score the "heldout" people's. Evasive answers, leaks and
    false refusals need no knowledge of the people and are learned; a wrong value in place of the
    true one needs the person's facts, which this micro model (random weights) does not have."""
    world = make_world(0, n_people=30, n_companies=3, absent_fraction=0.0, heldout_fraction=0.3)
    train = write_preference_data(world, tmp_path / "train.jsonl", "train")
    heldout = write_preference_data(world, tmp_path / "heldout.jsonl", "heldout")
    path = recipe(tmp_path, chat_base, 60, micro_batch_size=16, grad_accum=1, lr=1e-3, warmup_steps=5,
                  eval_every=60, save_every=60, log_every=10)
    model_dir = train_reward(load_reward_config(path, [f"data.train_path={train}", f"data.val_path={heldout}"]))

    scorer = RewardScorer.load(model_dir)
    right: dict[str, list[bool]] = {}
    for pair, record in zip(read_pairs(heldout), map(json.loads, heldout.read_text().splitlines())):
        chosen_score, rejected_score = scorer.score([pair.prompt] * 2, [pair.chosen[0]["content"],
                                                                        pair.rejected[0]["content"]])
        group = record["flaw"]
        right.setdefault(group, []).append(chosen_score > rejected_score)
    accuracy = {group: sum(oks) / len(oks) for group, oks in right.items()}
    overall = sum(sum(oks) for oks in right.values()) / sum(map(len, right.values()))
    print(f"held-out pairwise accuracy {overall:.0%}: " + ", ".join(f"{g} {a:.0%} ({len(right[g])})"
                                                               for g, a in accuracy.items()))
    assert min(accuracy[flaw] for flaw in ("leak", "false_refusal", "evasive")) >= 0.95
    assert metrics(tmp_path / "out")[-1]["val_accuracy"] == pytest.approx(overall)
