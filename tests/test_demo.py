"""`lmforge demo` at a tiny size: every stage runs and the report agrees with the run's own records."""

from __future__ import annotations

import json
import re

from lmforge.cli import main


def test_demo_report_matches_the_run(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--people", "12", "--steps", "30"]) == 0
    report = (out / "report.md").read_text()
    for section in ("## The world", "## Tokenizer", "## Pretraining", "## What pretraining taught",
                    "## Real sizes"):
        assert section in report
    records = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    last_val = [r for r in records if "val_loss" in r][-1]
    assert f"| {last_val['step']} |" in report and f"{last_val['val_loss']:.3f}" in report
    assert (out / "pretrain" / "loss.png").stat().st_size > 1000
    assert (out / "pretrain" / "model" / "model.safetensors").is_file()
    right = re.search(r"Overall \*\*(\d+)%\*\* right", report)
    assert right and 0 <= int(right[1]) <= 100
    assert "| llama2-7b | 6.74 B |" in report
