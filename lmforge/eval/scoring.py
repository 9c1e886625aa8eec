"""Log-likelihood of continuations given contexts, on token ids, batched with shared contexts.

A batch runs two forward passes: the distinct contexts, left-padded, into a KV cache (only the
last position's logits are computed); then the cache is copied once per continuation and every
continuation but its last token is fed after its context, right-padded. A question's choices so
share one pass over its context, and logits are taken only where continuation tokens are scored."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.console import Progress
from lmforge.kv_cache import KVCache
from lmforge.seq2seq import Seq2SeqLM, shift_right

Request = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)


def fit_context(context: Sequence[int], continuation: Sequence[int], max_length: int) -> tuple[int, ...]:
    """The context cut from the left so that context + continuation[:-1] fits `max_length` (as lm-eval cuts)."""
    if not context:
        raise ValueError("empty context: start it with a BOS or document-separator token")
    if not continuation:
        raise ValueError("empty continuation: nothing to score")
    if len(continuation) > max_length:
        raise ValueError(f"continuation of {len(continuation)} tokens exceeds the context of {max_length} tokens")
    return tuple(context[-(max_length + 1 - len(continuation)) :])


@torch.inference_mode()
def loglikelihoods(
    model: nn.Module,
    requests: Sequence[Request],
    *,
    batch_size: int = 32,
    max_length: int | None = None,
    max_tokens: int = 16384,
    progress: bool = False,
) -> list[tuple[float, bool]]:
    """For each (context, continuation): the summed log-probability of the continuation's tokens
    and whether greedy decoding would produce them all. A batch holds up to `batch_size` distinct
    contexts (with all their continuations) and `max_tokens` padded positions, but at least one context."""
    limit = max_length or model.config.max_position_embeddings
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (context, continuation) in enumerate(requests):
        groups.setdefault(fit_context(context, continuation, limit), []).append(i)
    contexts = sorted(groups, key=len, reverse=True)  # similar lengths together: little padding
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    bar = Progress(total=len(requests), desc="log-likelihoods", unit="seq", disable=not progress)
    for batch in _pack(contexts, [[len(requests[i][1]) for i in groups[c]] for c in contexts], batch_size, max_tokens):
        indices = [groups[c] for c in batch]
        scores = _score_batch(model, batch, [[requests[i][1] for i in group] for group in indices])
        for i, score in zip((i for group in indices for i in group), scores):
            results[i] = score
        bar.update(len(scores))
    bar.close()
    return results


def _pack(
    contexts: Sequence[tuple[int, ...]], lengths: Sequence[Sequence[int]], batch_size: int, max_tokens: int
) -> list[Sequence[tuple[int, ...]]]:
    """Consecutive runs of contexts (longest first) whose continuations fit the batch limits."""
    batches, start = [], 0
    while start < len(contexts):
        end, rows, tail = start + 1, len(lengths[start]), max(lengths[start])
        while end < len(contexts) and end - start < batch_size:
            more, longer = rows + len(lengths[end]), max(tail, *lengths[end])
            if more * (len(contexts[start]) + longer) > max_tokens:
                break
            end, rows, tail = end + 1, more, longer
        batches.append(contexts[start:end])
        start = end
    return batches


def _score_batch(
    model: nn.Module, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[Sequence[int]]]
) -> list[tuple[float, bool]]:
    param = next(model.parameters())
    device = param.device
    longest = max(len(c) for c in contexts)
    conts = [list(c) for group in continuations for c in group]
    rows = torch.tensor([b for b, group in enumerate(continuations) for _ in group], device=device)
    tail_len = max(len(c) for c in conts) - 1

    ids = torch.zeros(len(contexts), longest, dtype=torch.long)
    for b, context in enumerate(contexts):
        ids[b, longest - len(context) :] = torch.tensor(context)
    pads = torch.tensor([longest - len(c) for c in contexts], device=device)
    cache = KVCache(model.config, len(contexts), longest + tail_len, dtype=param.dtype, device=device)
    first = model(ids.to(device), pad=pads if pads.any() else None, cache=cache, last_only=True)[:, -1]
    logits = [first[rows]]  # predicts each continuation's first token
    lengths = torch.tensor([len(c) for c in conts], device=device)
    if tail_len:
        cache.keep_rows(rows)
        tail = torch.zeros(len(conts), tail_len, dtype=torch.long)
        for r, c in enumerate(conts):
            tail[r, : len(c) - 1] = torch.tensor(c[:-1])
        row_pads = pads[rows]
        out = model(tail.to(device), pad=row_pads if row_pads.any() else None, cache=cache)
        logits.append(out[torch.arange(tail_len, device=device)[None] < lengths[:, None] - 1])

    # Scored positions: each row's first token, then every row's remaining tokens in row order.
    targets = torch.tensor([c[0] for c in conts] + [t for c in conts for t in c[1:]], device=device)
    owner = torch.cat([torch.arange(len(conts), device=device), torch.repeat_interleave(
        torch.arange(len(conts), device=device), lengths - 1)])
    scores = torch.cat(logits).float()
    token_logp = F.log_softmax(scores, dim=-1).gather(1, targets[:, None])[:, 0]
    hits = (scores.argmax(dim=-1) == targets).long()
    total = torch.zeros(len(conts), device=device).index_add_(0, owner, token_logp)
    greedy = torch.zeros(len(conts), dtype=torch.long, device=device).index_add_(0, owner, hits) == lengths
    return list(zip(total.tolist(), greedy.tolist()))


def rolling_windows(tokens: Sequence[int], prefix: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs that score every token of `tokens` exactly once, the first
    given `prefix`, each with as much preceding context as fits (lm-eval's disjoint rolling windows)."""
    tokens = list(tokens)
    if not tokens:
        raise ValueError("no tokens to score")
    done = min(max_length, len(tokens))
    windows = [([prefix], tokens[:done])]
    while done < len(tokens):
        end = min(done + max_length, len(tokens))
        windows.append((tokens[end - max_length - 1 : done], tokens[done:end]))
        done = end
    return windows


def rolling_loglikelihoods(
    model: nn.Module, documents: Sequence[Sequence[int]], prefix: int, *, max_length: int | None = None, **kwargs
) -> list[float]:
    """Total log-likelihood of each token sequence, scored in rolling windows after `prefix`."""
    limit = max_length or model.config.max_position_embeddings
    windows = [rolling_windows(doc, prefix, limit) for doc in documents]
    scores = loglikelihoods(model, [w for doc in windows for w in doc], max_length=limit, **kwargs)
    totals, at = [], 0
    for doc in windows:
        totals.append(sum(score for score, _ in scores[at : at + len(doc)]))
        at += len(doc)
    return totals


@torch.inference_mode()
def seq2seq_loglikelihoods(
    model: Seq2SeqLM, requests: Sequence[Request], *, batch_size: int = 32, progress: bool = False,
) -> list[tuple[float, bool]]:
    """For each (encoder input ids, decoder target ids): the summed log-probability the decoder gives the
    target's tokens (teacher-forced after the decoder-start token), and whether greedy decoding would produce
    them all. A batch holds up to `batch_size` distinct inputs, each encoded once, with all their targets."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (source, target) in enumerate(requests):
        if not source or not target:
            raise ValueError(f"request {i}: empty {'input' if not source else 'target'}: nothing to score")
        groups.setdefault(tuple(source), []).append(i)
    sources = list(groups)
    device = next(model.parameters()).device
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    bar = Progress(total=len(requests), desc="log-likelihoods", unit="seq", disable=not progress)
    for start in range(0, len(sources), batch_size):
        batch = sources[start : start + batch_size]
        ids = torch.zeros(len(batch), max(map(len, batch)), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, source in enumerate(batch):
            ids[b, : len(source)], mask[b, : len(source)] = torch.tensor(source), 1
        hidden = model.encode(ids.to(device), mask.to(device))
        members = [i for source in batch for i in groups[source]]
        rows = torch.tensor([b for b, source in enumerate(batch) for _ in groups[source]], device=device)
        labels = torch.full((len(members), max(len(requests[i][1]) for i in members)), -100, dtype=torch.long)
        for r, i in enumerate(members):
            labels[r, : len(requests[i][1])] = torch.tensor(requests[i][1])
        labels = labels.to(device)
        logits = model(None, shift_right(labels, model.config), attention_mask=mask.to(device)[rows],
                       encoder_hidden=hidden[rows]).float()
        scored = labels != -100
        token_logp = F.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        totals = (token_logp * scored).sum(dim=1)
        greedy = ((logits.argmax(dim=-1) == labels) | ~scored).all(dim=1)
        for i, total, hit in zip(members, totals.tolist(), greedy.tolist()):
            results[i] = (total, hit)
        bar.update(len(members))
    bar.close()
    return results
