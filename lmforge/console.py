"""What a command shows: progress bars on a terminal (one plain line per logging interval in a log
file or a pipe), and third-party warnings that a user cannot act on hidden unless `--verbose`."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

from tqdm.auto import tqdm

# Loggers of libraries that announce, at import or load time, things a user cannot act on
# (torchao's missing CUDA kernels and triton, torch's pytree deprecations, transformers' notices).
NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "transformers", "sentence_transformers", "huggingface_hub",
                 "datasets", "lm_eval", "httpx", "bm25s")


def hide_third_party_noise() -> None:
    """Silence other libraries' warnings and log messages below ERROR; lmforge's own warnings still show.
    Called by the command line's entry point (never at import), unless `--verbose`."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers configures its logger
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")  # read when mlflow configures its loggers (and alembic's)
    os.environ.setdefault("WANDB_SILENT", "true")  # W&B's banners, run links and sync hints
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="(?!lmforge)")


def on_terminal() -> bool:
    return sys.stderr.isatty() or "ipykernel" in sys.modules


class Progress(tqdm):
    """tqdm's bar on a terminal. Elsewhere nothing is drawn, and each `set_postfix` (called once per
    logging interval) prints one plain line: `train 200/600 loss=2.314 lr=1.00e-03`."""

    def __init__(self, iterable: Any = None, *args: Any, disable: bool = False, **kwargs: Any) -> None:
        self.plain = not disable and not on_terminal()
        # A disabled tqdm keeps neither its description nor its count: the plain lines keep their own.
        self.label, self.count = kwargs.get("desc") or "", kwargs.get("initial", 0)
        super().__init__(iterable, *args, disable=disable or self.plain, **kwargs)

    def update(self, n: float = 1) -> bool | None:
        self.count += n
        return super().update(n)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        if not self.plain:
            return super().set_postfix(ordered_dict, refresh, **kwargs)
        fields = " ".join(f"{k}={v}" for k, v in {**(ordered_dict or {}), **kwargs}.items())
        total = f"/{self.total}" if self.total else ""
        print(f"{self.label} {self.count:g}{total} {fields}".strip(), file=sys.stderr, flush=True)
