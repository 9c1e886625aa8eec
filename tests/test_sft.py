"""`lmforge sft`: data formats and their loss masks, bad records, the mixture sampler, and LoRA /
full runs end to end (resume equals an uninterrupted run; the adapter loads for generation)."""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from chat_data import labelled_text, write_jsonl

from lmforge.checkpoint import load_model
from lmforge.cli import main
from lmforge.data.chat import IGNORE, SFTData, collate, encode, pack, read_messages, response_prompts
from lmforge.data.sampling import MixtureSource
from lmforge.generate.session import Session
from lmforge.tokenizer import Tokenizer
from lmforge.generate.sampling import SamplingParams
from lmforge.generate.text import complete, stop_token_ids
from lmforge.io import RecordError
from lmforge.train.run_dir import table_cell
from lmforge.train.sft import SFTConfig, load_data
from lmforge.world.documents import questions, write_instruction_data
from lmforge.world.people import make_world

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where was Alice born?"},
        {"role": "assistant", "content": "Port Alder"}, {"role": "user", "content": "And Bruno?"},
        {"role": "assistant", "content": "Eastbrook"}]


@pytest.fixture(scope="module")
def base(chat_base) -> Path:
    return chat_base


@pytest.fixture(scope="module")
def tokenizer(chat_tokenizer) -> Tokenizer:
    return chat_tokenizer


@pytest.mark.parametrize("record, expected", [
    ({"messages": CHAT}, ["Port Alder<|im_end|>", "Eastbrook<|im_end|>"]),
    ({"instruction": "Name a city.", "input": "", "output": "Vantor"}, ["Vantor<|im_end|>"]),
    ({"instruction": "Translate.", "input": "bonjour", "output": "hello"}, ["hello<|im_end|>"]),
    ({"prompt": "Where was Alice born?", "completion": "Port Alder"}, ["Port Alder<|im_end|>"]),
    ({"prompt": CHAT[:2], "completion": CHAT[2:3]}, ["Port Alder<|im_end|>"]),
])
def test_loss_covers_exactly_the_assistant_tokens(tmp_path, tokenizer, record, expected):
    [(line, messages)] = list(read_messages(write_jsonl(tmp_path / "d.jsonl", [record])))
    example = encode(tokenizer, messages, max_len=200)
    assert line == 1 and labelled_text(tokenizer, example) == expected
    ids, mask = tokenizer.render_chat(messages)
    assert example.input_ids == ids[:-1]
    assert example.labels == [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
    if "instruction" in record and record["input"]:
        assert "bonjour" in messages[0]["content"]


@pytest.mark.parametrize("record, where", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "field 'messages': no assistant turn"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "field 'messages[0].role'"),
    ({"messages": [{"role": "user", "content": 3}]}, "field 'messages[0].content'"),
    ({"instruction": "x"}, "field 'output'"),
    ({"prompt": "x", "completion": ["y"]}, "field 'completion'"),
    ({"text": "plain"}, "field '<record>'"),
    ("{not json", "field '<record>': not valid JSON"),
])
def test_bad_records_name_file_line_and_field(tmp_path, record, where):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": CHAT}, "", record])
    with pytest.raises(RecordError) as e:
        list(read_messages(path))
    assert str(e.value).startswith(f"{path}:3: {where}")


def test_truncation_is_counted_and_hopeless_examples_dropped(tmp_path, tokenizer):
    long_question = "tell me " * 60
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "hi", "completion": "Vantor " * 40},  # the answer is cut
        {"prompt": long_question, "completion": "no"},  # the answer lies beyond max_len
        {"prompt": "hi", "completion": "ok"},
    ])
    data = SFTData.load(path, tokenizer, max_len=32)
    assert (len(data.examples), data.truncated, data.dropped) == (2, 1, 1)
    assert all(len(e.input_ids) <= 32 for e in data.examples)


def test_collate_and_pack_keep_labels_aligned(tokenizer):
    examples = [encode(tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": a}], 100)
                for q, a in [("a", "b"), ("where?", "Port Alder, of course"), ("x", "y")]]
    batch = collate(examples, pad_id=tokenizer.pad_id)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        assert batch["input_ids"][row, :n].tolist() == e.input_ids and batch["labels"][row, :n].tolist() == e.labels
        assert (batch["labels"][row, n:] == IGNORE).all()
    packed = pack(examples, 16)
    flat_ids = [t for e in examples for t in e.input_ids]
    flat_labels = [t for e in examples for t in e.labels]
    assert len(packed) == len(flat_ids) // 16
    assert [t for e in packed for t in e.input_ids] == flat_ids[: 16 * len(packed)]
    assert [t for e in packed for t in e.labels] == flat_labels[: 16 * len(packed)]


def test_mixture_follows_weights_and_resumes(tokenizer):
    a = [encode(tokenizer, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "A"}], 50)] * 5
    b = [encode(tokenizer, [{"role": "user", "content": "b"}, {"role": "assistant", "content": "BB"}], 50)] * 7
    first_a = a[0].input_ids[0:1]
    source = MixtureSource([a, b], [3.0, 1.0], partial(collate, pad_id=0), global_batch=8, seed=0)
    rows = [source.next_batch() for _ in range(100)]
    from_a = sum(int((r["labels"] != IGNORE).sum(dim=1).eq(len([t for t in a[0].labels if t != IGNORE])).sum())
                 for r in rows)
    assert first_a and abs(from_a / 800 - 0.75) < 0.05

    source = MixtureSource([a, b], [3.0, 1.0], partial(collate, pad_id=0), global_batch=8, seed=0)
    for _ in range(10):
        source.next_batch()
    state = source.state_dict()
    expected = [source.next_batch()["input_ids"] for _ in range(5)]
    resumed = MixtureSource([a, b], [3.0, 1.0], partial(collate, pad_id=0), global_batch=8, seed=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, resumed.next_batch()["input_ids"]) for x in expected)


def recipe(tmp_path: Path, base: Path, method: str, steps: int, **train) -> Path:
    world = make_world(0, n_people=20, n_companies=4)
    data = write_instruction_data(world, tmp_path / "qa.jsonl", "train")
    settings = {"steps": steps, "micro_batch_size": 4, "grad_accum": 2, "lr": 5e-3, "warmup_steps": 1,
                "log_every": 1, "eval_every": 2, "save_every": 2, "keep_last": 10, "peak_flops": 1e12, **train}
    config = {"out_dir": str(tmp_path / "out"), "base": str(base),
              "data": {"datasets": [{"path": str(data)}], "max_len": 64, "val_fraction": 0.2, "eval_batches": 2},
              "adapter": {"method": method, "r": 4, "alpha": 8, "targets": "all-linear"}, "train": settings}
    path = tmp_path / "sft.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_lora_run_learns_resumes_exactly_and_loads_for_generation(tmp_path, base, capsys):
    whole = recipe(tmp_path / "whole", base, "lora", 6)
    assert main(["sft", "--config", str(whole)]) == 0
    out = tmp_path / "whole" / "out"
    losses = [m["loss"] for m in metrics(out) if "loss" in m]
    assert losses[-1] < losses[0]
    adapter = out / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in adapter.iterdir()}
    assert not (out / "model").exists()
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base.resolve())

    # As if killed after the step-4 checkpoint: resuming reproduces the uninterrupted run exactly.
    shutil.rmtree(out / "checkpoints" / "step-000006")
    shutil.move(adapter, tmp_path / "uninterrupted")
    assert main(["sft", "--config", str(whole), "--resume"]) == 0
    a = load_file(tmp_path / "uninterrupted" / "adapter_model.safetensors")
    b = load_file(adapter / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in metrics(out) if "loss" in m] == losses

    # `--checkpoint ADAPTER_DIR` serves the base with the adapter merged in
    session = Session.load(adapter)
    tuned = load_model(base)
    from lmforge.peft.adapters import load_adapter

    load_adapter(tuned, adapter)
    ids = torch.tensor([session.tokenizer.encode("Where was Alice born?")])
    with torch.no_grad():
        torch.testing.assert_close(session.model(ids), tuned(ids), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(session.model(ids), load_model(base)(ids), atol=1e-3)

    merged = tmp_path / "merged"
    assert main(["merge", "--checkpoint", str(adapter), "--out", str(merged)]) == 0
    with torch.no_grad():
        torch.testing.assert_close(load_model(merged)(ids), tuned(ids), rtol=1e-4, atol=1e-4)
    assert (merged / "tokenizer.json").is_file()


def test_full_fine_tuning_writes_a_model_and_only_changes_what_trains(tmp_path, base):
    assert main(["sft", "--config", str(recipe(tmp_path, base, "full", 2))]) == 0
    out = tmp_path / "out" / "model"

    # report.md beside the outputs: parameters, every validation record, the curve, the configuration
    report = (tmp_path / "out" / "report.md").read_text()
    n = load_model(out).num_parameters()
    assert f"Parameters: {n:,} ({n:,} trained, 100.00%)" in report
    for record in [r for r in metrics(tmp_path / "out") if "val_loss" in r]:
        assert f"| {record['step']} | {record['val_loss']:.4g} |" in report
    assert "![training curve](loss.png)" in report and (tmp_path / "out" / "loss.png").is_file()
    assert f"out_dir: {tmp_path / 'out'}" in report and "method: full" in report
    # sample generations: the saved model's greedy replies to the first validation prompts
    config = SFTConfig.model_validate(yaml.safe_load((tmp_path / "sft.yaml").read_text()))
    session = Session.load(out)
    _, val = load_data(config.data, session.tokenizer, config.train.seed)
    prompts = response_prompts(val)
    params = SamplingParams(max_new_tokens=48, temperature=0.0,
                            stop_token_ids=stop_token_ids(session.model.config, session.tokenizer))
    replies = complete(session.engine, session.tokenizer, prompts, params)
    assert len(prompts) == 4 and "## Samples" in report
    for reply in replies:
        assert f"| {table_cell(reply.text)} |" in report
    tuned, original = load_model(out).state_dict(), load_model(base).state_dict()
    assert all(not torch.equal(tuned[k], original[k]) for k in original if "layers.0" in k)
    assert (out / "tokenizer.json").is_file()

    assert main(["sft", "--config", str(recipe(tmp_path / "sel", base, "selective", 2)),
                 "adapter.layers=[-1]", "adapter.patterns=[]"]) == 0
    tuned = load_model(tmp_path / "sel" / "out" / "model").state_dict()
    changed = {k for k in original if not torch.equal(tuned[k], original[k])}
    assert changed and all(k.startswith("model.layers.1.") for k in changed)


def test_bad_recipe_and_data_errors(tmp_path, base, capsys):
    path = recipe(tmp_path, base, "lora", 2)
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [{"messages": CHAT}, {"messages": [{"role": "user", "content": "no answer"}]}])
    assert main(["sft", "--config", str(path), f"data.datasets=[{{path: {bad}}}]"]) == 2
    assert f"{bad}:2: field 'messages': no assistant turn" in capsys.readouterr().err
    assert main(["sft", "--config", str(path), "adapter.method=magic"]) == 2
    assert "adapter.method" in capsys.readouterr().err


def test_trainable_tokens_teach_the_end_of_turn(tmp_path, base):
    """The base never saw `<|im_end|>`: LoRA alone leaves its output row random and its probability
    after an answer near 1/vocab; training the marker rows (PEFT's trainable_token_indices) gives it
    most of the mass, on questions about people the fine-tuning never named."""
    world = make_world(0, n_people=20, n_companies=4)
    heldout = [q.messages() for q in questions(world, "heldout")]
    chance = {}
    for tokens in ([], ["<|im_start|>", "<|im_end|>"]):
        path = recipe(tmp_path / str(len(tokens)), base, "lora", 40, micro_batch_size=8, grad_accum=1)
        config = yaml.safe_load(path.read_text())
        config["adapter"]["trainable_tokens"] = tokens
        path.write_text(json.dumps(config))
        assert main(["sft", "--config", str(path)]) == 0
        session = Session.load(tmp_path / str(len(tokens)) / "out" / "adapter")
        tok = session.tokenizer
        end = tok.token_to_id("<|im_end|>")
        probabilities = []
        for chat in heldout:
            ids = tok.encode(tok.apply_chat_template(chat[:1], add_generation_prompt=True) + chat[1]["content"])
            with torch.no_grad():
                probabilities.append(session.model(torch.tensor([ids]))[0, -1].softmax(-1)[end].item())
        chance[len(tokens)] = sum(probabilities) / len(probabilities)
    print(f"P(<|im_end|>) after held-out answers: LoRA {chance[0]:.3f}, with the marker rows {chance[2]:.3f}")
    assert chance[0] < 0.05 and chance[2] > 0.3
