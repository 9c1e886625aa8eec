"""An lmforge checkpoint as an lm-evaluation-harness model, registered as "lmforge".

`LMForgeLM` tokenizes as lm-eval's `hf` model does (its `TemplateLM` base splits contexts from
continuations), scores log-likelihoods with `lmforge.eval.scoring` (a question's choices share one
pass over their context) and generates with the engine. `run_harness` is
`lmforge eval --harness lm-eval --tasks ...`."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:
    raise ImportError("the lm-eval adapter needs lm-evaluation-harness: pip install lm-eval") from e

from lmforge.console import Progress
from lmforge.eval.scoring import loglikelihoods, rolling_loglikelihoods
from lmforge.generate.quantize import Quantization
from lmforge.generate.sampling import SamplingParams
from lmforge.generate.session import Session
from lmforge.generate.text import complete, stop_token_ids


@register_model("lmforge")
class LMForgeLM(TemplateLM):
    """`pretrained`: a checkpoint directory (or a loaded `Session`). `batch_size` counts prompts
    (generation) or distinct contexts (log-likelihood, each with all its continuations) per batch.
    `max_length` defaults to the model's context; `prefix_token_id` (what empty contexts and
    rolling windows start from) to BOS, else EOS, as for lm-eval's `hf` model."""

    def __init__(
        self,
        pretrained: str | Path | Session,
        batch_size: int | str = 32,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        dtype: str | None = None,
        device: str = "cpu",
        prefix_token_id: int | None = None,
        quantize: Quantization | None = None,
    ) -> None:
        super().__init__()
        if isinstance(pretrained, Session):
            self.session, self.name = pretrained, "session"
        else:
            self.session, self.name = (Session.load(pretrained, dtype=dtype, device=device, quantize=quantize),
                                      str(pretrained))
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = int(batch_size)
        if self.session.encoder_decoder:
            raise ValueError(f"{self.name}: lm-eval's lmforge model runs decoder-only models; evaluate an "
                             "encoder-decoder model with --task, or with lm-eval's hf model (backend=seq2seq)")
        self.model, self.tokenizer = self.session.model, self.session.tokenizer
        self._device = device
        self.max_length = max_length or self.session.context
        self.max_gen_toks = max_gen_toks
        self._add_bos = bool(self.tokenizer.config.get("add_bos_token", False))
        self._prefix = prefix_token_id
        if self.eot_token_id is None:
            raise ValueError("the tokenizer has no eos_token")

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        if self._prefix is not None:
            return self._prefix
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """Token ids, with BOS where the tokenizer adds one (unless told not to, or already there)."""
        bos = self.tokenizer.special_tokens["bos_token"]
        add = self._add_bos if add_special_tokens is None else add_special_tokens and self._add_bos
        ids = self.tokenizer.encode(string, add_bos=add and not (bos and string.startswith(bos)))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        scores = loglikelihoods(self.model, [(context, continuation) for _, context, continuation in requests],
                                batch_size=self.batch_size, max_length=self.max_length, progress=not disable_tqdm)
        for (key, _, _), score in zip(requests, scores):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, score)
        return scores

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        strings = [request.args[0] for request in requests]
        totals = rolling_loglikelihoods(self.model, [self.tok_encode(s) for s in strings], self.prefix_token_id,
                                        max_length=self.max_length, batch_size=self.batch_size,
                                        progress=not disable_tqdm)
        for string, total in zip(strings, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Generate for each (context, generation arguments), batched per distinct arguments."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(i)
        results = [""] * len(requests)
        bar = Progress(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for indices in groups.values():
            params, until = self._sampling(requests[indices[0]].args[1])
            room = max(1, self.max_length - params.max_new_tokens)
            prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=room) for i in indices]
            for start in range(0, len(indices), self.batch_size):
                batch = complete(self.session.engine, self.tokenizer, prompts[start : start + self.batch_size],
                                 params, until)
                for i, completion in zip(indices[start : start + self.batch_size], batch):
                    results[i] = completion.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, completion.text)
                bar.update(len(batch))
        bar.close()
        return results

    def _sampling(self, gen_kwargs: dict[str, Any]) -> tuple[SamplingParams, list[str]]:
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0))
        top_k, top_p = kwargs.pop("top_k", None), kwargs.pop("top_p", None)
        if kwargs:
            raise ValueError(f"unsupported generation arguments: {', '.join(sorted(kwargs))}")
        params = SamplingParams(
            max_new_tokens=max_new, temperature=temperature if sample else 0.0, top_k=top_k, top_p=top_p,
            stop_token_ids=stop_token_ids(self.model.config, self.tokenizer))
        return params, until

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        text = self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)
        if add_generation_prompt or not chat_history:
            return text
        last = chat_history[-1]["content"]  # continue the final message: cut its end-of-turn marker
        return text[: text.rindex(last) + len(last)]


def run_harness(
    checkpoint: str | Path | Session,
    tasks: Sequence[str],
    *,
    include_path: str | Path | None = None,
    include_defaults: bool = True,
    shots: int | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    chat: bool = False,
    seed: int = 0,
    dtype: str | None = None,
    quantize: Quantization | None = None,
    bootstrap_iters: int = 100_000,
) -> dict[str, Any]:
    """Run lm-evaluation-harness tasks (its own, and those in `include_path`) on an lmforge
    checkpoint; returns lm-eval's results (per-sample logs left out)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ValueError("name at least one lm-eval task")
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"no task folder {include_path}")
    manager = TaskManager(include_path=str(include_path) if include_path else None, include_defaults=include_defaults)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s): {', '.join(unknown)}")
    results = lm_eval.simple_evaluate(
        model=LMForgeLM(checkpoint, batch_size=batch_size, dtype=dtype, quantize=quantize), tasks=list(tasks),
        num_fewshot=shots, limit=limit, task_manager=manager, log_samples=False, apply_chat_template=chat,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        bootstrap_iters=bootstrap_iters)
    return results


def harness_table(results: dict[str, Any]) -> str:
    """lm-eval's markdown table of the results."""
    from lm_eval.utils import make_table

    return make_table(results)
