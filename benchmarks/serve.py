"""Serving under load: 1, 4 and 16 concurrent streaming clients against `lmforge serve` on loopback.

Two servers run the same tiny-but-real model (vocab from a BPE tokenizer trained on the built-in
world, hidden 384, 6 layers): lmforge with continuous batching (up to 16 rows), and the same server
limited to one row at a time (`--max-batch-size 1`, what a server without batching does). Each
server runs in its own process; the clients are threads here, each sending its requests one after
another. Prints requests/s, generated tokens/s, p50/p99 time to first token and to the last token,
and the aggregate tokens/s over the single-client figure (the issue's goal: at least 4x at 16). A last
case sends the highest concurrency's requests with `response_format` (a JSON schema) to the batching
server: tokens/s with the grammar's token mask against the same load without it."""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from lmforge.checkpoint import save_model
from lmforge.presets import preset
from lmforge.model import Transformer
from lmforge.tokenizer import train_tokenizer
from lmforge.world.documents import write_pretraining_corpus
from lmforge.world.people import make_world

REPLY_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "tags"], "properties": {
    "name": {"type": "string", "maxLength": 40},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 8}}}
STRUCTURED = {"response_format": {"type": "json_schema", "json_schema": {"name": "reply", "schema": REPLY_SCHEMA}}}
PROMPTS = ["Alice Moreau was born in", "The headquarters of", "Her employer is", "He studied", "Tell me about",
           "The CEO of", "She works as", "In 1987,"]


def build_checkpoint(workdir: Path, context: int) -> Path:
    world = make_world(seed=0, n_people=60)
    corpus = write_pretraining_corpus(world, workdir / "corpus.jsonl")
    out = workdir / "model"
    tokenizer = train_tokenizer([corpus], 2048, out, show_progress=False)
    model = Transformer(preset("tiny", vocab_size=tokenizer.vocab_size, max_position_embeddings=context))
    model.init_weights(seed=0)
    save_model(model, out)
    tokenizer.save(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, max_batch_size: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "lmforge.cli", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
           "--model-name", "bench", "--max-batch-size", str(max_batch_size)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start")


def one_request(url: str, prompt: str, max_tokens: int, extra: dict | None = None) -> tuple[float, float, int]:
    """(time to first token, time to last token, completion tokens) of one streamed completion."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "stream": True,
            "stream_options": {"include_usage": True}, **(extra or {})}
    start = time.perf_counter()
    first = None
    tokens = 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter() - start
    return first if first is not None else end, end, tokens


def load(url: str, clients: int, requests_each: int, max_tokens: int, extra: dict | None = None) -> dict[str, float]:
    def client(c: int) -> list[tuple[float, float, int]]:
        return [one_request(url, PROMPTS[(c + i) % len(PROMPTS)], max_tokens, extra) for i in range(requests_each)]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - start
    ttft = sorted(r[0] for r in results)
    total = sorted(r[1] for r in results)

    def p99(xs: list[float]) -> float:
        return xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))]

    return {"req/s": len(results) / wall, "tok/s": sum(r[2] for r in results) / wall,
            "ttft p50": statistics.median(ttft), "ttft p99": p99(ttft),
            "last p50": statistics.median(total), "last p99": p99(total)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrency levels")
    parser.add_argument("--requests", type=int, default=2, help="requests per client at each level")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    args = parser.parse_args()

    scratch = tempfile.TemporaryDirectory()  # removed when the benchmark exits
    workdir = Path(scratch.name)
    checkpoint = build_checkpoint(workdir, context=256)
    table: dict[str, dict[int, dict[str, float]]] = {}
    for name, batch in (("lmforge (continuous)", 16), ("one row at a time", 1)):
        proc, url = start_server(checkpoint, batch)
        try:
            one_request(url, PROMPTS[0], 8)  # warm-up
            table[name] = {c: load(url, c, args.requests, args.max_tokens) for c in args.clients}
            if batch > 1:
                structured = load(url, args.clients[-1], args.requests, args.max_tokens, STRUCTURED)
        finally:
            proc.terminate()
            proc.wait(30)

    header = f"{'server':<22}{'clients':>8}{'req/s':>8}{'tok/s':>9}{'x 1 client':>11}" \
             f"{'ttft p50':>10}{'ttft p99':>10}{'last p50':>10}{'last p99':>10}"
    print("\n" + header)
    for name, levels in table.items():
        single = levels[args.clients[0]]["tok/s"]
        for clients, m in levels.items():
            print(f"{name:<22}{clients:>8}{m['req/s']:>8.2f}{m['tok/s']:>9.1f}{m['tok/s'] / single:>11.2f}"
                  f"{m['ttft p50']:>10.3f}{m['ttft p99']:>10.3f}{m['last p50']:>10.3f}{m['last p99']:>10.3f}")
    print()
    top = args.clients[-1]
    lm, seq = table["lmforge (continuous)"][top], table["one row at a time"][top]
    print(f"RESULT serve_{top}_clients lmforge={lm['tok/s']:.1f} reference={seq['tok/s']:.1f} unit=tok/s "
          f"ratio={lm['tok/s'] / seq['tok/s']:.2f}")
    print(f"RESULT serve_scaling_{top}_over_1 ratio={lm['tok/s'] / table['lmforge (continuous)'][args.clients[0]]['tok/s']:.2f}")
    print(f"\nJSON-schema replies, {top} clients: {structured['tok/s']:.1f} tok/s, {structured['req/s']:.2f} req/s, "
          f"ttft p50 {structured['ttft p50']:.3f} s (plain: {lm['tok/s']:.1f} tok/s)")
    print(f"RESULT serve_structured_{top}_clients lmforge={structured['tok/s']:.1f} reference={lm['tok/s']:.1f} "
          f"unit=tok/s ratio={structured['tok/s'] / lm['tok/s']:.2f}")


if __name__ == "__main__":
    main()
