"""Shared fixtures: tiny transformers checkpoints of every family, saved inside the test's tmp_path."""

import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch
from hf_models import tiny_hf_model

# Variants that switch on config fields the plain families leave off.
VARIANTS = {
    # Llama-3 RoPE with one frequency in each regime: kept (wavelength 6), smoothed (63), divided (628, 6283).
    "llama3-smooth": ("llama3", dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 100})),
    "llama-bias": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "qwen2-sliding": (  # one full-attention layer, then one sliding-window layer
        "qwen2",
        dict(use_sliding_window=True, sliding_window=8, max_window_layers=1,
             layer_types=["full_attention", "sliding_attention"]),
    ),
}
SHARPEN = 5.0


def pytest_collection_modifyitems(items):
    # Files with slow tests first: `make test`'s two workers take whole files in this order, so the longest
    # ones start at once and the short ones fill in around them.
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


def pytest_configure(config):
    # Inductor's on-disk cache does not key its code by ATEN_CPU_CAPABILITY: a decode step compiled
    # under avx512 and replayed under avx2 gave wrong tokens (all 0). One cache per capability.
    capability = os.environ.get("ATEN_CPU_CAPABILITY", "native")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"torchinductor-{capability}"))
    # The models here are tiny: a second intra-op thread buys nothing, and on a busy two-core
    # machine its spin-waiting made these tests ten times slower.
    torch.set_num_threads(1)


def sharp_hf_model(name: str, **overrides):
    """`tiny_hf_model` with its matrices scaled up (`overrides`: config fields). At the default init (std 0.02)
    attention is nearly uniform and the logits tiny, so a wrong RoPE or mask moved them by barely 1e-3; scaled,
    such mistakes move them by ~1 while exact implementations still agree to ~1e-6."""
    family, variant = VARIANTS.get(name, (name, {}))
    model = tiny_hf_model(family, **variant, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(SHARPEN)
    return model


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory) -> Path:
    """A micro llama with a trained BPE tokenizer (ChatML template), saved as an HF directory."""
    from chat_data import make_chat_base

    return make_chat_base(tmp_path_factory.mktemp("chat-base"))


@pytest.fixture(scope="module")
def sharp_base(tmp_path_factory, chat_base) -> Path:
    """The micro chat model with its matrices scaled up: peaked next-token distributions, as a
    trained model has, so that a few dozen rollouts can move probability between candidates."""
    from lmforge.checkpoint import load_model, save_model
    from lmforge.tokenizer import Tokenizer

    model = load_model(chat_base)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    out = tmp_path_factory.mktemp("sharp") / "model"
    save_model(model, out, tokenizer=Tokenizer.from_dir(chat_base))
    return out


@pytest.fixture(scope="module")
def chat_tokenizer(chat_base):
    from lmforge.tokenizer import Tokenizer

    return Tokenizer.from_dir(chat_base)


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: `hf_checkpoint(name)` -> (transformers model, directory it was saved to)."""

    def make(name: str, **save_kwargs) -> tuple[torch.nn.Module, Path]:
        model = sharp_hf_model(name)
        path = tmp_path / f"hf-{name}"
        model.save_pretrained(path, **save_kwargs)
        return model, path

    return make


@pytest.fixture(scope="module")
def offline():
    """No network: the Hugging Face libraries told so, and any internet connection refused."""
    connect = socket.socket.connect

    def refuse(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"network access in an offline test: {address}")
        return connect(sock, address)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(socket.socket, "connect", refuse)
        yield
