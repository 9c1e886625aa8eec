"""A uvicorn server on loopback in a background thread, `lmforge serve` as a process, and the tiny
chat checkpoint they serve."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
import uvicorn
from conftest import SHARPEN
from hf_models import tiny_hf_model

from lmforge.generate.engine import Engine
from lmforge.generate.sampling import SamplingParams
from lmforge.generate.session import Session
from lmforge.generate.text import stop_token_ids
from lmforge.tokenizer import train_tokenizer

VOCAB = 300


def make_chat_checkpoint(path: Path, corpus_dir: Path, context: int = 128) -> Path:
    """A tiny llama with a trained BPE tokenizer (ChatML template) and a context of `context` tokens,
    sharpened so that greedy picks are far from ties, saved as an HF-format directory at `path`."""
    corpus = corpus_dir / "corpus.txt"
    corpus.write_text("the cat sat on the mat. the dog ate the bone. héllo wörld 👋 日本語\n" * 30)
    tokenizer = train_tokenizer([corpus], VOCAB, path, show_progress=False)
    hf = tiny_hf_model("llama", vocab_size=VOCAB, max_position_embeddings=context)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() >= 2:
                p.mul_(SHARPEN)
    hf.config.eos_token_id = hf.generation_config.eos_token_id = tokenizer.eos_id
    hf.save_pretrained(path)
    tokenizer.save(path)
    return path


def greedy_reference(session: Session, prompt: list[int], max_tokens: int) -> tuple[str, str, int]:
    """(text, finish reason, tokens) of a greedy completion by a fresh engine over the session's
    model, one prompt alone: what a server must reproduce whatever it batches with."""
    stops = stop_token_ids(session.model.config, session.tokenizer)
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0, stop_token_ids=stops)
    tokens = Engine(session.model).generate([prompt], params)[0]
    stopped = bool(tokens) and tokens[-1] in stops
    text = session.tokenizer.decode([t for t in tokens if t not in stops], skip_special_tokens=True)
    return text, "stop" if stopped else "length", len(tokens)


def slow_down_decoding(engine: Engine, monkeypatch, seconds: float = 0.02) -> Engine:
    """Make each decode step of `engine` take `seconds` longer, so that a request lasts long enough
    to be joined, stopped or abandoned midway, however fast or busy the machine."""
    decode = engine.decode

    def slow(*args):
        time.sleep(seconds)
        return decode(*args)

    monkeypatch.setattr(engine, "decode", slow)
    return engine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`with LiveServer(app) as live:` serves `app` at `live.url` until the block ends."""

    def __init__(self, app) -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@dataclass
class Served:
    """A running `lmforge serve` process: its base URL, port and combined output file."""

    url: str
    port: int
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def lmforge_serve(log: Path, *args: str, timeout: float = 120) -> Iterator[Served]:
    """`lmforge serve ARGS --port P` as a subprocess on a free port, yielded once `/health` answers;
    terminated (then killed if it lingers) when the block ends."""
    port = free_port()
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", *args, "--port", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    served = Served(f"http://127.0.0.1:{port}", port, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert process.poll() is None, f"lmforge serve exited with {process.returncode}:\n{served.output()}"
            assert time.monotonic() < deadline, f"lmforge serve did not answer in {timeout} s:\n{served.output()}"
            try:
                if httpx.get(served.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield served
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
