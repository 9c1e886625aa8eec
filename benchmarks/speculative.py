"""Speculative decoding by prompt lookup on grounded answers: the demo's retrieval-tuned model answers
held-out questions from its context store (the best source in the prompt, as `lmforge rag ask` puts it),
greedily, one question at a time: plain decoding vs prompt lookup, in lmforge and in transformers
(`generate(prompt_lookup_num_tokens=K)`), on the same prompts. Prints a table, the acceptance rate,
whether the outputs equal plain decoding's, and `RESULT` lines (speed-up over plain decoding, and
lmforge's prompt lookup against transformers'). Needs `make demo` first (or `--demo DIR`)."""

from __future__ import annotations

import argparse
import time
from functools import partial
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
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (the fastest of each decoding is kept)")
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

    def plain(prompt: list[int]) -> list[int]:
        return engine.generate([prompt], params)[0]

    stats = {k: SpeculativeStats() for k in args.lookup}
    counting = True  # drafts are counted in the first round (every round drafts the same)

    def lookup(k: int, prompt: list[int]) -> list[int]:
        return list(speculative_stream(session.model, prompt, params, PromptLookup(k=k),
                                       stats[k] if counting else None))

    def hf(k: int | None, prompt: list[int]) -> list[int]:
        with torch.inference_mode():
            out = reference.generate(torch.tensor([prompt]), max_new_tokens=args.new_tokens, do_sample=False,
                                     eos_token_id=stops, pad_token_id=stops[0], prompt_lookup_num_tokens=k)
        return out[0, len(prompt):].tolist()

    cases = {"lmforge plain": plain, "transformers plain": partial(hf, None),
             **{f"lmforge prompt lookup K={k}": partial(lookup, k) for k in args.lookup},
             **{f"transformers prompt lookup K={k}": partial(hf, k) for k in args.lookup}}
    # Each prompt's fastest time per decoding over the rounds; the decodings take turns on each prompt, so load
    # from other processes falls on all alike.
    best = {name: [float("inf")] * len(prompts) for name in cases}
    outputs: dict[str, list[list[int]]] = {name: [[] for _ in prompts] for name in cases}
    same = dict.fromkeys(cases, True)
    for _ in range(args.repeats):
        for i, prompt in enumerate(prompts):
            for name, run in cases.items():  # plain first: the others are compared with its answer
                start = time.perf_counter()
                outputs[name][i] = run(prompt)
                best[name][i] = min(best[name][i], time.perf_counter() - start)
                same[name] &= outputs[name][i] == outputs["lmforge plain"][i]
        counting = False
    tokens = sum(map(len, outputs["lmforge plain"]))
    rows = [(name, tokens / sum(best[name]), same[name]) for name in cases]
    print(f"\n{len(prompts)} grounded answers, greedy, batch 1, fp32, {torch.get_num_threads()} threads, "
          f"each answer's fastest of {args.repeats} rounds\n")
    print(f"{'decoding':<34}{'tok/s':>10}{'same output as plain':>22}")
    for name, speed, equal in rows:
        print(f"{name:<34}{speed:>10.1f}{str(equal):>22}")
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
