"""Run a task against a loaded checkpoint: generation through the engine, multiple choice and
perplexity by log-likelihood. `run_eval` loads a checkpoint and a task and evaluates, as `lmforge eval --task` does.

An encoder-decoder model (a `Seq2SeqSession`) takes each prompt as its encoder's input, with no chat template,
and scores a choice as the decoder's log-likelihood of it (then `</s>`) given the context as input, as
lm-eval's `hf` model does for seq2seq; perplexity, which needs a text's own likelihood, is refused."""

from __future__ import annotations

import math
import random
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lmforge.console import Progress
from lmforge.data.hub_datasets import is_hub_dataset
from lmforge.eval import metrics
from lmforge.eval.calibration import choice_probabilities
from lmforge.eval.registry import build_task, is_registered, registered_tasks
from lmforge.eval.scoring import loglikelihoods, rolling_loglikelihoods, seq2seq_loglikelihoods
from lmforge.eval.tasks import (
    ChoiceItem, GenerationItem, Task, check_shots, choice_context, choice_messages, draw_exemplars, extract_answer,
    generation_messages, generation_text, load_hub_task, load_task_file,
)
from lmforge.generate.quantize import Quantization
from lmforge.generate.sampling import SamplingParams
from lmforge.generate.session import Session
from lmforge.generate.text import complete, stop_token_ids
from lmforge.tokenizer import Tokenizer

DEFAULT_MAX_NEW_TOKENS, COT_MAX_NEW_TOKENS = 32, 256


def answer_tokens(cot: bool) -> int:
    """The default length of a generated answer: longer when it reasons step by step first."""
    return COT_MAX_NEW_TOKENS if cot else DEFAULT_MAX_NEW_TOKENS


def load_task(spec: str | Path, *, split: str = "test", columns: Mapping[str, str] | None = None) -> Task:
    """A registered task by name (see `lmforge.eval.registry`), a task file or directory (see
    `lmforge.eval.tasks`), or a Hub dataset `hf:org/name[:config][@revision]` (its `split`, fields renamed
    by `columns`; exemplars from its train split)."""
    if is_registered(str(spec)):
        return build_task(str(spec))
    if is_hub_dataset(spec):
        return load_hub_task(str(spec), split=split, columns=columns)
    if not Path(spec).exists():
        raise FileNotFoundError(f"no task file or directory {spec}, and no built-in task of that name "
                                f"(built-in: {', '.join(registered_tasks()) or 'none registered'})")
    return load_task_file(spec)


def run_eval(checkpoint: str | Path, task: str | Path, *, dtype: str | None = None,
             quantize: Quantization | None = None, split: str = "test", columns: Mapping[str, str] | None = None,
             **options: Any) -> dict[str, Any]:
    """Load the checkpoint (weights in `dtype`, linear layers quantized by `quantize`) and the task (see
    `load_task`), evaluate with `options` (those of `evaluate`), and return the results (metrics, settings,
    samples)."""
    loaded = load_task(task, split=split, columns=columns)
    session = Session.load(checkpoint, dtype=dtype, quantize=quantize)
    return {"checkpoint": str(checkpoint), **evaluate(session, loaded, **options)}


def evaluate(
    session: Session,
    task: Task,
    *,
    shots: int = 0,
    limit: int | None = None,
    seed: int = 0,
    cot: bool = False,
    chat: bool = False,
    sampling: SamplingParams | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a loaded model on a task. `shots` exemplars per item are drawn with `seed` from the
    task's exemplar pool; `cot` asks for chain-of-thought generation; `chat` renders prompts with
    the chat template. Generation follows `sampling` (default: greedy, `answer_tokens(cot)` new tokens;
    without a seed of its own it samples with `seed`). A batch holds `batch_size` prompts
    (generation) or contexts (log-likelihood: a question with all its choices, a text window)."""
    check_shots(task, shots)
    if cot and task.kind != "generation":
        raise ValueError(f"chain of thought applies to generation tasks; {task.name} is a {task.kind} task")
    if chat and task.kind == "perplexity":
        raise ValueError(f"{task.name} is a perplexity task: it scores raw text, not chats")
    if session.encoder_decoder and task.kind == "perplexity":
        raise ValueError(f"{task.name} is a perplexity task: an encoder-decoder model scores a target given an "
                         "input, not a text's own likelihood")
    if session.encoder_decoder and chat:
        raise ValueError("chat mode needs a chat template; an encoder-decoder model has none (its prompt is the "
                         "encoder's input)")
    if chat and session.tokenizer.chat_template is None:
        raise ValueError("chat mode needs a tokenizer with a chat_template")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    items = task.items[:limit]
    rng = random.Random(seed)
    exemplars = [draw_exemplars(task, item, shots, rng) if shots else [] for item in items]
    settings = {"task": task.name, "kind": task.kind, "n": len(items), "shots": shots, "seed": seed,
                "chat": chat}
    if task.kind == "generation":
        sampling = sampling or SamplingParams(max_new_tokens=answer_tokens(cot), temperature=0)
        params = sampling.stopping_at(stop_token_ids(session.model.config, session.tokenizer),
                                      seed=seed if sampling.seed is None else None)
        settings |= {"cot": cot, **params.model_dump(include={"max_new_tokens", "temperature", "top_k", "top_p"})}
        return settings | _generation(session, task, items, exemplars, params, cot, chat, batch_size, progress)
    if task.kind == "choice":
        return settings | _choice(session, task, items, exemplars, chat, batch_size, progress)
    return settings | _perplexity(session, items, batch_size, progress)


def document_prefix(tokenizer: Tokenizer) -> int:
    """The token raw text starts after: BOS where the tokenizer adds one, else the EOS that
    separates pretraining documents."""
    add_bos = bool(tokenizer.config.get("add_bos_token", False))
    token = tokenizer.bos_id if add_bos or tokenizer.eos_id is None else tokenizer.eos_id
    if token is None:
        raise ValueError("the tokenizer has neither a bos_token nor an eos_token to start a document with")
    return token


def encode_continuation(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a context and of its continuation as they read together (whitespace at the
    context's end moves to the continuation, as lm-eval does)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, head = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return head, whole[len(head) :]


def _generation(
    session: Session, task: Task, items: Sequence[GenerationItem], exemplars: Sequence[Sequence[GenerationItem]],
    params: SamplingParams, cot: bool, chat: bool, batch_size: int, progress: bool,
) -> dict[str, Any]:
    tokenizer = session.tokenizer
    room = max(1, session.context - params.max_new_tokens)
    if chat:
        inputs: list[Any] = [generation_messages(item, shots, cot) for item, shots in zip(items, exemplars)]
        prompts = [session.chat_prompt(m, reserve=params.max_new_tokens)[-room:] for m in inputs]
        stop: list[str] = []
    elif session.encoder_decoder:  # the whole prompt is the input; the decoder writes the answer alone
        inputs = [generation_text(task, item, shots, cot) for item, shots in zip(items, exemplars)]
        prompts, stop = [session.encode(text) for text in inputs], []
    else:
        inputs = [generation_text(task, item, shots, cot) for item, shots in zip(items, exemplars)]
        prompts = [([document_prefix(tokenizer)] + tokenizer.encode(text))[-room:] for text in inputs]
        stop = ["\n\n"] if cot else ["\n"]  # exemplars are separated by a blank line; answers are one line
    completions, latency = [], []
    started = time.perf_counter()
    for start in Progress(range(0, len(prompts), batch_size), desc=f"{task.name} generation", unit="batch",
                          disable=not progress):
        batch_started = time.perf_counter()
        completions += complete(session.engine, tokenizer, prompts[start : start + batch_size], params, stop)
        latency += [time.perf_counter() - batch_started] * (len(completions) - len(latency))
    seconds = time.perf_counter() - started
    outputs = [c.text for c in completions]
    answered = [c.token_ids + ([] if c.stop_token is None else [c.stop_token]) for c in completions]
    confidence = _confidences(session, prompts, answered, batch_size)
    predictions = [extract_answer(o, cot) for o in outputs]
    answers = [item.answer for item in items]
    em = [metrics.exact_match(p, a) for p, a in zip(predictions, answers)]
    em_norm = [metrics.exact_match(p, a, normalize=True) for p, a in zip(predictions, answers)]
    f1 = [metrics.token_f1(p, a) for p, a in zip(predictions, answers)]
    scores = {"exact_match": _mean(em), "exact_match_normalized": _mean(em_norm), "f1": _mean(f1),
              **metrics.rouge(predictions, answers), "bleu": metrics.bleu(predictions, answers)}
    samples = [{"input": i, "answer": a, "output": o, "prediction": p, "exact_match": e, "f1": f, "confidence": c}
               for i, a, o, p, e, f, c in zip(inputs, answers, outputs, predictions, em, f1, confidence)]
    generated = sum(len(c.token_ids) for c in completions)
    flops = [forward_flops(session, len(p) + len(c.token_ids)) for p, c in zip(prompts, completions)]
    efficiency = _efficiency(session, seconds, len(items), None if None in flops else sum(flops), latency)
    return {"metrics": scores, "samples": samples,
            "efficiency": {**efficiency, "generated_tokens": generated,
                           "generated_tokens_per_second": generated / seconds,
                           "tokens_per_second": (generated + sum(map(len, prompts))) / seconds}}


def _confidences(session: Session, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                 batch_size: int) -> list[float]:
    """Each generated answer's probability under the model: exp of the summed log-probabilities of its
    tokens, up to and including the one that ended it (a stop token, or the one holding a stop string).
    An answer cut at the token limit has no ending to score; one with no tokens at all has probability 1."""
    scored = [i for i, answer in enumerate(answers) if answer]
    requests = [(prompts[i], answers[i]) for i in scored]
    score = seq2seq_loglikelihoods if session.encoder_decoder else loglikelihoods
    confidence = [1.0] * len(answers)
    for i, (total, _) in zip(scored, score(session.model, requests, batch_size=batch_size) if requests else []):
        confidence[i] = math.exp(total)
    return confidence


def forward_flops(session: Session, tokens: int, after: int = 0) -> float | None:
    """Forward FLOPs of `tokens` tokens at positions after+1 .. after+tokens of a decoder-only model
    (a cached context of `after` tokens before them), the usual estimate: each token at position t costs
    2 x the matmul weights (output head included) + 4 x layers x heads x head_dim x t (scores and weighted
    values). None for an encoder-decoder."""
    if session.encoder_decoder:
        return None
    config = session.model.config
    attention = 4 * config.num_hidden_layers * config.num_attention_heads * config.head_dim
    positions = tokens * after + tokens * (tokens + 1) // 2
    return 2 * config.matmul_parameters() * tokens + attention * positions


def _efficiency(session: Session, seconds: float, items: int, flops: float | None,
                latency: Sequence[float] | None) -> dict[str, Any]:
    """Wall time, throughput, the mean latency of a request (the time of the batch it was in; None where
    requests are not batched as such), forward FLOPs per item, the weights' size, and the peak resident
    memory of the whole process so far (None where the platform does not report it)."""
    weights = sum(p.numel() * p.element_size() for p in session.model.parameters())
    return {"seconds": seconds, "items_per_second": items / seconds,
            "latency_s": sum(latency) / len(latency) if latency else None,
            "flops_per_item": None if flops is None else flops / items, "weights_mb": weights / 2**20,
            "process_peak_rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _choice(
    session: Session, task: Task, items: Sequence[ChoiceItem], exemplars: Sequence[Sequence[ChoiceItem]],
    chat: bool, batch_size: int, progress: bool,
) -> dict[str, Any]:
    tokenizer = session.tokenizer
    requests, inputs = [], []
    for item, shots in zip(items, exemplars):
        if chat:
            inputs.append(choice_messages(item, shots))
            context = tokenizer.apply_chat_template(inputs[-1], add_generation_prompt=True)
            prefix, delimiter = [], ""
        else:
            inputs.append(context := choice_context(task, item, shots))
            prefix, delimiter = [document_prefix(tokenizer)], " "
        for choice in item.choices:
            if session.encoder_decoder:  # input and target encoded apart, each with `</s>` (lm-eval's seq2seq)
                requests.append((session.encode(context), session.encode(delimiter + choice)))
                continue
            head, tail = encode_continuation(tokenizer, context, delimiter + choice)
            requests.append((prefix + head, tail))
    started = time.perf_counter()
    score = seq2seq_loglikelihoods if session.encoder_decoder else loglikelihoods
    scores = score(session.model, requests, batch_size=batch_size, progress=progress)
    seconds = time.perf_counter() - started
    samples, at = [], 0
    for item, shown in zip(items, inputs):
        lls = [score for score, _ in scores[at : at + len(item.choices)]]
        at += len(item.choices)
        best, best_norm = metrics.choose(lls, item.choices)
        probabilities = choice_probabilities(lls)
        samples.append({"input": shown, "choices": list(item.choices), "answer_index": item.answer_index,
                        "loglikelihoods": lls, "probabilities": probabilities, "prediction": best,
                        "prediction_norm": best_norm, "confidence": probabilities[best]})
    acc = _mean([s["prediction"] == s["answer_index"] for s in samples])
    acc_norm = _mean([s["prediction_norm"] == s["answer_index"] for s in samples])
    # Fed through the model: each distinct context once, then every continuation but its last token.
    contexts = {tuple(context) for context, _ in requests}
    flops = [forward_flops(session, len(c)) for c in contexts] + [
        forward_flops(session, len(continuation) - 1, len(context)) for context, continuation in requests]
    efficiency = _efficiency(session, seconds, len(items), None if None in flops else sum(flops), None)
    efficiency["tokens_per_second"] = (sum(map(len, contexts)) + sum(len(c) - 1 for _, c in requests)) / seconds
    return {"metrics": {"acc": acc, "acc_norm": acc_norm}, "samples": samples, "efficiency": efficiency}


def _perplexity(session: Session, items: Sequence[Any], batch_size: int, progress: bool) -> dict[str, Any]:
    tokenizer = session.tokenizer
    texts = [item.text for item in items]
    documents = tokenizer.encode_batch(texts)
    totals = rolling_loglikelihoods(session.model, documents, document_prefix(tokenizer), batch_size=batch_size,
                                    progress=progress)
    nll = -sum(totals)
    tokens = sum(len(d) for d in documents)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    words = sum(len(re.split(r"\s+", t)) for t in texts)  # as lm-eval counts them
    scores = {"perplexity": metrics.perplexity(nll, tokens), "word_perplexity": metrics.perplexity(nll, words),
              "bits_per_byte": metrics.bits_per_byte(nll, n_bytes), "tokens": tokens, "bytes": n_bytes}
    samples = [{"text": t, "loglikelihood": ll, "tokens": len(d)} for t, ll, d in zip(texts, totals, documents)]
    return {"metrics": scores, "samples": samples}


def _mean(values: Sequence[float | bool]) -> float:
    return sum(values) / len(values)


def summary(results: dict[str, Any]) -> str:
    """The results' metrics as a small table for the terminal."""
    modes = (", chat" if results["chat"] else "") + (", chain of thought" if results.get("cot") else "")
    lines = [f"{results['task']} ({results['kind']}, {results['n']} items, {results['shots']}-shot{modes})"]
    for name, value in results["metrics"].items():
        lines.append(f"  {name:<24}{value:>16,}" if isinstance(value, int) else f"  {name:<24}{value:>16,.4f}")
    return "\n".join(lines)

