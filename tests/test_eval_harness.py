"""The lm-eval adapter against lm-eval's own `hf` model: the same HF-format checkpoint (a tiny
transformers llama with a tokenizer trained here) on local YAML tasks, offline, must give the same
acc/acc_norm, per-choice log-likelihoods, word perplexity and greedy generations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_models import tiny_hf_model

from lmforge.tokenizer import train_tokenizer
from lmforge.world.documents import write_pretraining_corpus
from lmforge.world.people import make_world
from lmforge.world.tasks import world_task

MAX_LENGTH = 64  # below the biographies' length: perplexity runs in rolling windows
TASKS = ("toy_mc", "toy_ppl", "toy_gen")


pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """An HF-format llama + tokenizer directory, and local lm-eval tasks over JSONL files."""
    root = tmp_path_factory.mktemp("harness")
    corpus = write_pretraining_corpus(make_world(0, n_people=20, n_companies=4), root / "corpus.jsonl", variants=1)
    tokenizer = train_tokenizer([corpus], 400, root / "tok", show_progress=False)
    model = tiny_hf_model("llama", vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                          eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    with torch.no_grad():  # decisive logits: a scoring mistake moves them visibly
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(5.0)
    model.save_pretrained(root / "model")
    tokenizer.save(root / "model")

    mc = world_task("world-mc", people=20)
    write_jsonl(root / "mc_test.jsonl", [{"question": i.question, "choices": list(i.choices), "answer": i.answer_index}
                                         for i in mc.items[:16]])
    write_jsonl(root / "mc_train.jsonl", [{"question": i.question, "choices": list(i.choices), "answer": i.answer_index}
                                          for i in mc.exemplars[:20]])
    write_jsonl(root / "bios.jsonl", [{"text": i.text} for i in world_task("world-bios", people=20).items[:4]])
    write_jsonl(root / "gen.jsonl", [{"prompt": i.question, "answer": i.choices[i.answer_index]}
                                     for i in mc.items[16:24]])
    tasks = root / "tasks"
    tasks.mkdir()

    def data(**files: str) -> str:
        return "dataset_path: json\ndataset_kwargs:\n  data_files:\n" + "".join(
            f"    {split}: {root / name}\n" for split, name in files.items())

    (tasks / "toy_mc.yaml").write_text(
        "task: toy_mc\n" + data(test="mc_test.jsonl", train="mc_train.jsonl") +
        "test_split: test\nfewshot_split: train\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "num_fewshot: 2\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (tasks / "toy_ppl.yaml").write_text(
        "task: toy_ppl\n" + data(test="bios.jsonl") +
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    (tasks / "toy_gen.yaml").write_text(
        "task: toy_gen\n" + data(test="gen.jsonl") +
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n', '.']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return root


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def evaluate(model, workdir: Path, **kwargs) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(workdir / "tasks"), include_defaults=False)
    return lm_eval.simple_evaluate(model=model, tasks=list(TASKS), task_manager=manager, bootstrap_iters=0,
                                   log_samples=True, **kwargs)


@pytest.fixture(scope="module")
def reference(workdir) -> dict:
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(workdir / "model"), device="cpu", batch_size=8, max_length=MAX_LENGTH)
    return evaluate(lm, workdir)


def responses(results: dict, task: str) -> list:
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_adapter_matches_lm_evals_hf_model(workdir, reference):
    import lm_eval.api.registry

    from lmforge.eval.harness import LMForgeLM

    assert lm_eval.api.registry.get_model("lmforge") is LMForgeLM
    ours = evaluate("lmforge", workdir, model_args=f"pretrained={workdir / 'model'},max_length={MAX_LENGTH}",
                    batch_size=8)
    mc, ref_mc = ours["results"]["toy_mc"], reference["results"]["toy_mc"]
    assert (mc["acc,none"], mc["acc_norm,none"]) == (ref_mc["acc,none"], ref_mc["acc_norm,none"])
    ours_ll, ref_ll = responses(ours, "toy_mc"), responses(reference, "toy_mc")
    assert len(ours_ll) == 16
    for doc, ref_doc in zip(ours_ll, ref_ll):
        for [(ll, greedy)], [(ref, ref_greedy)] in zip(doc, ref_doc):
            assert ll == pytest.approx(float(ref), abs=1e-4) and greedy == ref_greedy
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["toy_ppl"][metric] == pytest.approx(reference["results"]["toy_ppl"][metric], rel=1e-4)
    assert responses(ours, "toy_gen") == responses(reference, "toy_gen")
    assert any(r[0][0].strip() for r in responses(ours, "toy_gen"))  # something was generated


def test_run_harness_on_local_tasks(workdir, reference):
    from lmforge.eval.harness import harness_table, run_harness

    results = run_harness(workdir / "model", ["toy_mc"], include_path=workdir / "tasks", include_defaults=False,
                          batch_size=4, bootstrap_iters=0)
    # Its own context (128 tokens, more than the reference's 64) cuts no context of these questions.
    assert results["results"]["toy_mc"]["acc,none"] == reference["results"]["toy_mc"]["acc,none"]
    assert "toy_mc" in harness_table(results)
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        run_harness(workdir / "model", ["toy_nope"], include_path=workdir / "tasks", include_defaults=False)
    with pytest.raises(FileNotFoundError, match="no task folder"):
        run_harness(workdir / "model", ["toy_mc"], include_path=workdir / "missing")


def test_adapter_generates_speculatively_with_transformers_greedy_replies(workdir, reference):
    """With prompt lookup (one prompt after another), generate_until still replies with transformers' greedy text."""
    from lmforge.eval.harness import LMForgeLM
    from lmforge.generate.session import Session
    from lmforge.generate.speculative import PromptLookup, SpeculativeEngine

    session = Session.load(workdir / "model")
    session.engine = engine = SpeculativeEngine(session.model, PromptLookup(k=3))
    ours = evaluate(LMForgeLM(session, batch_size=8, max_length=MAX_LENGTH), workdir)
    assert responses(ours, "toy_gen") == responses(reference, "toy_gen")
    assert engine.stats.drafted > 0 and engine.stats.verifications < engine.stats.generated
