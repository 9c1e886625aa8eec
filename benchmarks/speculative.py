"""Speculative decoding by prompt lookup on grounded answers: the demo's retrieval-tuned model answers
held-out questions from its context store (the best source in the prompt, as `lmforge rag ask` puts it),
greedily, one question at a time: plain decoding vs prompt lookup, in lmforge and in transformers
(`generate(prompt_lookup_num_tokens=K)`), on the same prompts. Prints a table, the acceptance rate,
whether the outputs equal plain decoding's, and `RESULT` lines (speed-up over plain decoding, and
lmforge's prompt lookup against transformers'). Needs `make demo` first (or `--demo DIR`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lmforge.generate.engine import Engine
from lmforge.generate.session import Session
from lmforge.generate.speculative import PromptLookup, SpeculativeStats, speculative_stream
from lmforge.rag.answer import grounded_chat_prompt
from lmforge.rag.store import Store
from lmforge.world.people import world_of_size
from lmforge.world.store import retrieval_questions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="a finished demo's directory")
    parser.add_argument("--seed", type=int, default=0, help="the demo's seed (its world)")
    parser.add_argument("--questions", type=int, default=40, help="held-out questions answered")
    parser.add_argument("--lookup", type=int, nargs="+", default=[4, 8], help="draft lengths K to measure")
    parser.add_argument("--new-tokens", type=int, default=48, help="most tokens per answer")
    args = parser.parse_args()
    model_dir, store_dir = args.demo / "rag-sft" / "model", args.demo / "store"
    if not model_dir.is_dir() or not store_dir.is_dir():
        raise SystemExit(f"no retrieval-tuned model or store under {args.demo}: run `make demo` first")

    import transformers

    session = Session.load(model_dir)
    questions = [r.question.question for r in retrieval_questions(world_of_size(100, args.seed), "heldout")]
    questions = questions[: args.questions]
    params = session.greedy(args.new_tokens)
    with Store.open(store_dir) as store:
        prompts = [grounded_chat_prompt(session, [{"role": "user", "content": q}], hits, args.new_tokens)[0]
                   for q, hits in zip(questions, store.search_many(questions, 1))]
    engine = Engine(session.model)
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
    stops = list(params.stop_token_ids)

    def plain() -> list[list[int]]:
        return [engine.generate([p], params)[0] for p in prompts]

    def lookup(k: int, stats: SpeculativeStats) -> list[list[int]]:
        return [list(speculative_stream(session.model, p, params, PromptLookup(k=k), stats)) for p in prompts]

    def hf(k: int | None) -> list[list[int]]:
        outputs = []
        for p in prompts:
            with torch.inference_mode():
                out = reference.generate(torch.tensor([p]), max_new_tokens=args.new_tokens, do_sample=False,
                                         eos_token_id=stops, pad_token_id=stops[0], prompt_lookup_num_tokens=k)
            outputs.append(out[0, len(p):].tolist())
        return outputs

    rows, base, stats = [], None, {k: SpeculativeStats() for k in args.lookup}
    for name, run in [("lmforge plain", plain), ("transformers plain", lambda: hf(None)),
                      *[(f"lmforge prompt lookup K={k}", lambda k=k: lookup(k, stats[k])) for k in args.lookup],
                      *[(f"transformers prompt lookup K={k}", lambda k=k: hf(k)) for k in args.lookup]]:
        start = time.perf_counter()
        outputs = run()
        seconds = time.perf_counter() - start
        base = base or outputs
        tokens = sum(map(len, outputs))
        rows.append((name, tokens / seconds, outputs == base))
    print(f"\n{len(prompts)} grounded answers, greedy, batch 1, fp32, {torch.get_num_threads()} threads\n")
    print(f"{'decoding':<34}{'tok/s':>10}{'same output as plain':>22}")
    for name, speed, same in rows:
        print(f"{name:<34}{speed:>10.1f}{str(same):>22}")
    for k in args.lookup:
        print(f"lmforge prompt lookup K={k}: {stats[k].accepted} of {stats[k].drafted} drafted tokens kept "
              f"({stats[k].acceptance_rate:.0%}), {stats[k].generated} tokens in {stats[k].verifications} passes")
    speed = {name: s for name, s, _ in rows}
    for k in args.lookup:
        ours, theirs = speed[f"lmforge prompt lookup K={k}"], speed[f"transformers prompt lookup K={k}"]
        print(f"RESULT prompt_lookup_k{k}_speedup lmforge={ours:.1f} reference={speed['lmforge plain']:.1f} "
              f"unit=tok/s ratio={ours / speed['lmforge plain']:.2f}")
        print(f"RESULT prompt_lookup_k{k}_vs_transformers lmforge={ours:.1f} reference={theirs:.1f} unit=tok/s "
              f"ratio={ours / theirs:.2f}")


if __name__ == "__main__":
    main()
