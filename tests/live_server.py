"""A uvicorn server on loopback in a background thread, and the tiny chat checkpoint it serves."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import torch
import uvicorn
from conftest import SHARPEN
from hf_models import tiny_hf_model

from lmforge.tokenizer import train_tokenizer

VOCAB = 300


def make_chat_checkpoint(path: Path, corpus_dir: Path) -> Path:
    """A tiny llama with a trained BPE tokenizer (ChatML template), sharpened so that greedy picks
    are far from ties, saved as an HF-format directory at `path`."""
    corpus = corpus_dir / "corpus.txt"
    corpus.write_text("the cat sat on the mat. the dog ate the bone. héllo wörld 👋 日本語\n" * 30)
    tokenizer = train_tokenizer([corpus], VOCAB, path, show_progress=False)
    hf = tiny_hf_model("llama", vocab_size=VOCAB)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() >= 2:
                p.mul_(SHARPEN)
    hf.config.eos_token_id = hf.generation_config.eos_token_id = tokenizer.eos_id
    hf.save_pretrained(path)
    tokenizer.save(path)
    return path


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
