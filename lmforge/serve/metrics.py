"""`GET /metrics`: the server's counters in Prometheus' text format, as vLLM's and TGI's servers expose theirs
(outside the OpenAPI document, and without the API key, as `/health`). They count speculative decoding
(`lmforge serve --prompt-lookup K` or `--draft DIR`): the requests decoded speculatively and those decoded in
the batch instead, the drafts checked, the drafted tokens and how many of them the model kept."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi.responses import PlainTextResponse

from lmforge.serve.batcher import Batcher

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def prometheus_text(batcher: Batcher, model_name: str) -> str:
    """The counters (and the acceptance rate) in Prometheus' text exposition format, labelled with the model."""
    stats = batcher.speculative
    figures = [
        ("spec_decode_requests_total", "counter", "requests decoded speculatively", batcher.requests["speculative"]),
        ("spec_decode_fallback_requests_total", "counter", "requests decoded in the batch although a drafter is "
         "set (features speculative decoding does not serve)", batcher.requests["batched"]),
        ("spec_decode_num_drafts_total", "counter", "drafts checked (forward passes of the model)",
         stats.verifications),
        ("spec_decode_num_draft_tokens_total", "counter", "tokens drafted", stats.drafted),
        ("spec_decode_num_accepted_tokens_total", "counter", "drafted tokens the model kept", stats.accepted),
        ("spec_decode_num_emitted_tokens_total", "counter", "tokens generated speculatively", stats.generated),
        ("spec_decode_draft_acceptance_rate", "gauge", "kept / drafted tokens", stats.acceptance_rate),
    ]
    label = model_name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    lines = []
    for name, kind, help, value in figures:
        lines += [f"# HELP lmforge:{name} {help}", f"# TYPE lmforge:{name} {kind}",
                  f'lmforge:{name}{{model_name="{label}"}} {value}']
    return "\n".join(lines) + "\n"


def metrics_route(batcher: Batcher, model_name: str) -> Callable[[], Awaitable[PlainTextResponse]]:
    """The `/metrics` handler over `batcher`'s counters."""

    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(prometheus_text(batcher, model_name), media_type=CONTENT_TYPE)

    return metrics
