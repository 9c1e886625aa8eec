"""What commands show: other libraries' warnings hidden unless --verbose (lmforge's own kept), and
progress bars drawn on a terminal only."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

import lmforge.cli
from lmforge.console import Progress

NOISY = """
import warnings
{setup}
import torchao, transformers, peft  # torchao logs missing kernels and triton; torch logs pytree deprecations
from torchao.quantization import to_nf4
warnings.warn_explicit("theirs", FutureWarning, "x.py", 1, module="transformers.modeling_utils")
warnings.warn_explicit("ours", UserWarning, "gguf.py", 1, module="lmforge.export.gguf")
"""


def stderr_of(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stderr


def test_third_party_noise_is_hidden_and_ours_is_not():
    loud = stderr_of(NOISY.format(setup=""))
    quiet = stderr_of(NOISY.format(setup="from lmforge.console import hide_third_party_noise\nhide_third_party_noise()"))
    assert "theirs" in loud and "ours" in loud
    assert [line for line in quiet.splitlines() if line.strip()] == ["gguf.py:1: UserWarning: ours"]


@pytest.mark.parametrize("argv, hidden", [
    (["plan", "--flops", "1e20"], True),
    (["-v", "plan", "--flops", "1e20"], False),
    (["plan", "--flops", "1e20", "--verbose"], False),
])
def test_commands_hide_noise_unless_verbose(monkeypatch, capsys, argv, hidden):
    calls = []
    monkeypatch.setattr(lmforge.cli, "hide_third_party_noise", lambda: calls.append(True))
    assert lmforge.cli.main(argv) == 0
    assert "parameters" in capsys.readouterr().out
    assert calls == ([True] if hidden else [])


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_draws_on_a_terminal_only(monkeypatch, capsys):
    with Progress(total=4, desc="work") as bar:
        bar.update(3)
        bar.set_postfix(loss="1.5")
    assert capsys.readouterr().err == "work 3/4 loss=1.5\n"
    monkeypatch.setattr(sys, "stderr", terminal := Terminal())
    with Progress(total=4, desc="work", mininterval=0) as bar:
        bar.update(3)
        bar.set_postfix(loss="1.5")
    assert "\rwork:  75%" in terminal.getvalue() and "3/4" in terminal.getvalue() and "loss=1.5]" in terminal.getvalue()
