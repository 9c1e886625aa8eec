"""Multiple-choice scoring speed: lmforge vs lm-evaluation-harness's `hf` model (transformers).

The checkpoint is the `tiny` preset (hidden 384, 6 layers, 6 heads, 2 KV heads, MLP 1024) with the
vocabulary of a BPE tokenizer trained on the built-in world, random weights, fp32. The task is the
built-in `world-mc` (facts of held-out people, 4 choices each) written as a local lm-eval task with
K-shot exemplars. Both lm-eval models score the same requests (`LM.loglikelihood` on lm-eval's
instances); lmforge's own `evaluate` builds and scores the same questions from the task itself.
Prints a table (with the ratio of process CPU time too, steadier on a shared machine), then one
`RESULT` line per lmforge path, in questions per second of wall time."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from lmforge.checkpoint import save_model
from lmforge.presets import preset
from lmforge.eval.runner import evaluate
from lmforge.generate.session import Session
from lmforge.model import Transformer
from lmforge.tokenizer import train_tokenizer
from lmforge.world.documents import write_pretraining_corpus
from lmforge.world.people import make_world
from lmforge.world.tasks import world_task


def best_times(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, float]]:
    """Best wall time and best process CPU time of each case over `repeats` rounds after one
    warm-up; the cases take turns within a round, so load from other processes falls on all alike."""
    for fn in cases.values():
        fn()
    best = {name: (float("inf"), float("inf")) for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def write_task(root: Path, shots: int, questions: int) -> Path:
    """world-mc as an lm-eval task folder: test and exemplar JSONL files and the YAML."""
    task = world_task("world-mc")
    for split, items in (("test", task.items[:questions]), ("train", task.exemplars)):
        with (root / f"{split}.jsonl").open("w") as f:
            for i in items:
                record = {"question": i.question, "choices": list(i.choices), "answer": i.answer_index}
                f.write(json.dumps(record) + "\n")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "bench_mc.yaml").write_text(
        f"task: bench_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'test.jsonl'}\n"
        f"    train: {root / 'train.jsonl'}\ntest_split: test\nfewshot_split: train\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        f"num_fewshot: {shots}\nmetric_list:\n  - metric: acc\n")
    return tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=5, help="exemplars per question (default 5)")
    parser.add_argument("--questions", type=int, default=64, help="questions scored (default 64)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="questions per batch (default 32): lmforge's contexts, hf's 4-choice sequences x 4")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (best per case is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    from lmforge.eval.harness import LMForgeLM

    scratch = tempfile.TemporaryDirectory()  # removed when the benchmark exits
    root = Path(scratch.name)
    corpus = write_pretraining_corpus(make_world(0, n_people=100, n_companies=10), root / "corpus.jsonl")
    tokenizer = train_tokenizer([corpus], 8192, root / "tokenizer", show_progress=False)
    model = Transformer(preset("tiny", vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                               eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id))
    model.init_weights(seed=0)
    checkpoint = save_model(model, root / "model", tokenizer=tokenizer)

    task = get_task_dict(["bench_mc"], TaskManager(include_path=str(write_task(root, args.shots, args.questions)),
                                                   include_defaults=False))["bench_mc"]
    task.build_all_requests(rank=0, world_size=1)
    requests = task.instances
    n = len({r.doc_id for r in requests})

    reference = HFLM(pretrained=str(checkpoint), device="cpu", batch_size=4 * args.batch_size, dtype="float32")
    adapter = LMForgeLM(str(checkpoint), batch_size=args.batch_size)
    ref_scores = reference.loglikelihood(requests, disable_tqdm=True)
    our_scores = adapter.loglikelihood(requests, disable_tqdm=True)
    gap = max(abs(a[0] - b[0]) for a, b in zip(ref_scores, our_scores))

    session = Session.load(checkpoint)
    native_task = world_task("world-mc")
    native_task = replace(native_task, items=native_task.items[: args.questions])

    times = best_times({
        "hf": lambda: reference.loglikelihood(requests, disable_tqdm=True),
        "adapter": lambda: adapter.loglikelihood(requests, disable_tqdm=True),
        "native": lambda: evaluate(session, native_task, shots=args.shots, batch_size=args.batch_size, progress=False),
    }, args.repeats)
    tokens = sum(len(reference.tok_encode(r.args[0] + r.args[1])) for r in requests) / len(requests)
    rows = [(name, n / times[case][0], n / times["hf"][0], times["hf"][1] / times[case][1])
            for name, case in (("mc_loglik_native", "native"), ("mc_loglik_lm_eval_adapter", "adapter"))]

    print(f"\n{n} questions x 4 choices, {args.shots}-shot (~{tokens:.0f} tokens per sequence), vocab "
          f"{tokenizer.vocab_size}, {torch.get_num_threads()} threads; adapter vs hf log-likelihoods "
          f"differ by at most {gap:.1e}")
    print(f"{'case':<30}{'lmforge q/s':>14}{'lm-eval hf q/s':>17}{'ratio':>8}{'CPU-time ratio':>17}")
    for name, ours, ref, cpu_ratio in rows:
        print(f"{name:<30}{ours:>14.1f}{ref:>17.1f}{ours / ref:>8.2f}{cpu_ratio:>17.2f}")
    print("(CPU-time ratio: hf's process CPU seconds over lmforge's; steadier than wall time when other "
          "processes share the cores)\n")
    for name, ours, ref, _ in rows:
        print(f"RESULT {name} lmforge={ours:.1f} reference={ref:.1f} unit=q/s ratio={ours / ref:.2f}")


if __name__ == "__main__":
    main()
