"""Experiment trackers: a pretraining run through the command line logged to TensorBoard, W&B (offline)
and MLflow (its local store), each read back with the tracker's own reader and compared with
metrics.jsonl and with the configuration report.md shows; a killed and resumed run's TensorBoard
history (purged after the checkpoint) and continued MLflow and W&B runs; PPO's `ppo.loggers`;
a tracker whose package is missing and an unknown one, named before anything runs."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from chat_data import write_jsonl
from PIL import Image
from pydantic import ValidationError
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_pretrain import MODEL, recipe  # noqa: F401 (recipe: a fixture)
from test_ppo import QueuedScorer, recipe as ppo_recipe
from test_train import Killed, ListSource, config, lm_data, tiny_model

from lmforge.align.ppo import ppo
from lmforge.align.ppo_config import PPOSettings
from lmforge.cli import main
from lmforge.train.loop import Trainer, TrainConfig
from lmforge.train.losses import causal_lm_loss
from lmforge.train.run_dir import RunDir

EVERY_TRACKER = "train.loggers=[jsonl,tensorboard,wandb,mlflow]"


def tracker_env(root: Path) -> dict[str, str]:
    """Variables for a hermetic run: W&B offline with its caches under `root`, no MLflow server."""
    return {"WANDB_MODE": "offline", "WANDB_CACHE_DIR": str(root / "wandb-cache"),
            "WANDB_CONFIG_DIR": str(root / "wandb-config"), "WANDB_DATA_DIR": str(root / "wandb-data")}


@pytest.fixture
def trackers_env(monkeypatch, tmp_path):
    """`tracker_env` in this process (and the variables the command line's quiet mode sets), restored after."""
    for name in [k for k in os.environ if k.startswith(("WANDB_", "MLFLOW_"))]:
        monkeypatch.delenv(name)
    for name, value in {**tracker_env(tmp_path), "WANDB_SILENT": "true", "MLFLOW_LOGGING_LEVEL": "ERROR"}.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def tracked(recipe, tmp_path_factory) -> tuple[Path, str]:  # noqa: F811
    """`lmforge pretrain` for 6 steps (checkpoints at 2, 4, 6) logged to every tracker: its run directory and stderr."""
    root = tmp_path_factory.mktemp("tracked")
    out = root / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    result = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", "pretrain", "--config", str(recipe), f"out_dir={out}", *MODEL,
         "train.steps=6", EVERY_TRACKER],
        capture_output=True, text=True, timeout=600, env={**env, **tracker_env(root), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    return out, result.stderr


def report_config(run: Path) -> dict[str, Any]:
    """The configuration report.md shows."""
    text = (run / "report.md").read_text()
    return yaml.safe_load(text.split("## Configuration")[1].split("```yaml\n")[1].split("```")[0])


def unflatten(params: dict[str, Any]) -> dict[str, Any]:
    """Dotted parameters back into a nested mapping, text that is JSON decoded."""
    tree: dict[str, Any] = {}
    for key, value in params.items():
        *sections, leaf = key.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        node[leaf] = value
    return tree


def metric_history(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records if key in r]


def metric_keys(records: list[dict]) -> set[str]:
    return {k for r in records for k, v in r.items() if k != "step" and isinstance(v, (int, float))}


def png_pixels(data: bytes | Path) -> np.ndarray:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
        return np.asarray(image.convert("RGB"))


def tensorboard_events(run: Path) -> EventAccumulator:
    return EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()


def assert_tensorboard_scalars_are_the_metrics_log(run: Path) -> EventAccumulator:
    records, events = RunDir(run).records(), tensorboard_events(run)
    assert set(events.Tags()["scalars"]) == metric_keys(records)
    for key in metric_keys(records):  # TensorBoard keeps scalars as float32
        assert [(e.step, e.value) for e in events.Scalars(key)] == [
            (step, float(np.float32(value))) for step, value in metric_history(records, key)], key
    return events


def test_tensorboard_holds_the_metrics_the_configuration_and_the_plots(tracked):
    run, _ = tracked
    events = assert_tensorboard_scalars_are_the_metrics_log(run)
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert unflatten({k: v.number_value if v.WhichOneof("kind") == "number_value" else v.string_value
                      for k, v in hparams.items()}) == report_config(run)
    images = events.Images("plots/loss")
    assert [image.step for image in images] == [2, 4, 6]
    assert np.array_equal(png_pixels(images[-1].encoded_image_string), png_pixels(run / "loss.png"))


def wandb_log(run_dir: Path) -> list[dict]:
    """The records of a W&B run directory's transaction log, read by wandb's own inspector."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def test_wandb_offline_run_holds_the_metrics_the_configuration_and_the_plots(tracked):
    run, _ = tracked
    [offline] = (run / "wandb").glob("offline-run-*")
    log = wandb_log(offline)
    [started] = [r["run"] for r in log if r["type"] == "run"]
    assert started["display_name"] == "run" and started["project"] == "lmforge"
    assert started["run_id"] == json.loads((run / "trackers.json").read_text())["wandb"]
    config: dict[str, Any] = {}
    for update in [started["config"]] + [r["config"] for r in log if r["type"] == "config"]:
        config |= update["update"]
    config.pop("_wandb")
    assert config == report_config(run)
    rows = [r["history"]["item"] for r in log if r["type"] == "history"]
    records = RunDir(run).records()
    for key in metric_keys(records):
        assert [(row["_step"], row[key]) for row in rows if key in row] == metric_history(records, key), key
    plots = [(row["_step"], row["plots/loss.path"]) for row in rows if "plots/loss.path" in row]
    assert [step for step, _ in plots] == [2, 4, 6]
    assert np.array_equal(png_pixels(offline / "files" / plots[-1][1]), png_pixels(run / "loss.png"))
    assert [r["exit"]["exit_code"] for r in log if r["type"] == "exit"] == [0]


def test_mlflow_run_holds_the_metrics_the_configuration_and_the_plots(tracked):
    from mlflow import MlflowClient

    run, _ = tracked
    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    [found] = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id])
    assert found.info.run_name == "run" and found.info.status == "FINISHED"
    assert found.info.run_id == json.loads((run / "trackers.json").read_text())["mlflow"]
    assert unflatten(found.data.params) == report_config(run)
    records = RunDir(run).records()
    assert set(found.data.metrics) == metric_keys(records)
    for key in metric_keys(records):
        history = client.get_metric_history(found.info.run_id, key)
        assert sorted((m.step, m.value) for m in history) == metric_history(records, key), key
    images = [f.path for f in client.list_artifacts(found.info.run_id, "images") if f.path.endswith(".png")]
    assert sorted(int(p.split("+step+")[1].split("+")[0]) for p in images if "plots~loss" in p) == [2, 4, 6]


def test_third_party_output_is_hidden_without_verbose(tracked):
    _, stderr = tracked
    assert "train 6/6" in stderr
    assert not any(name in stderr.lower() for name in ("wandb", "mlflow", "alembic", "tensorboard")), stderr


def test_resumed_run_purges_tensorboard_after_the_checkpoint_and_continues_the_tracker_runs(tmp_path, trackers_env):
    from mlflow import MlflowClient

    cfg = config(steps=6, save_every=3, loggers=["tensorboard", "wandb", "mlflow"])
    out = tmp_path / "run"

    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_model(), cfg, Killed(lm_data(), 8), causal_lm_loss, out).run()
    killed = {e.step: e.value for e in tensorboard_events(out).Scalars("tokens_per_s")}
    assert sorted(killed) == [1, 2, 3, 4]
    ids = json.loads((out / "trackers.json").read_text())
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    assert client.get_run(ids["mlflow"]).info.status == "FAILED"

    Trainer(tiny_model(), cfg, ListSource(lm_data(), 8), causal_lm_loss, out).run(resume=True)
    events = assert_tensorboard_scalars_are_the_metrics_log(out)  # each step once, step 4 as logged again
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in events.Images("plots/loss")] == [3, 6]
    assert json.loads((out / "trackers.json").read_text()) == ids
    assert client.get_run(ids["mlflow"]).info.status == "FINISHED"
    assert {m.step for m in client.get_metric_history(ids["mlflow"], "loss")} == {1, 2, 3, 4, 5, 6}
    assert len(client.search_runs([client.get_run(ids["mlflow"]).info.experiment_id])) == 1
    offline = sorted((out / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(ids["wandb"]) for p in offline)
    resumed = [r["history"]["item"]["_step"] for r in wandb_log(offline[1]) if r["type"] == "history"]
    assert resumed == [4, 5, 6]


def test_ppo_logs_to_its_loggers(tmp_path, sharp_base):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"question {i}"} for i in range(4)])
    settings = ppo_recipe(tmp_path, sharp_base, prompts, 2)
    settings.ppo = PPOSettings.model_validate({**settings.ppo.model_dump(), "batch_size": 4, "save_every": 1,
                                               "loggers": ["jsonl", "tensorboard"]})
    ppo(settings, scorer=QueuedScorer([0.1, 0.5, 0.2, 0.9], [0.3, 0.4, 0.8, 0.1]))
    events = assert_tensorboard_scalars_are_the_metrics_log(settings.out_dir)
    assert "reward" in events.Tags()["scalars"]
    assert [e.step for e in events.Images("plots/reward")] == [1, 2]


def test_missing_package_and_unknown_tracker_stop_before_anything_runs(recipe, tmp_path, monkeypatch,  # noqa: F811
                                                                        capsys, trackers_env):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails as when it is not installed
    with pytest.raises(ValidationError, match=r"loggers[\s\S]*pip install 'lmforge\[wandb\]'"):
        TrainConfig(loggers=["jsonl", "wandb"])
    with pytest.raises(ValidationError, match=r"loggers[\s\S]*pip install 'lmforge\[wandb\]'"):
        PPOSettings(loggers=["wandb"])
    assert main(["pretrain", "--config", str(recipe), f"out_dir={tmp_path / 'run'}", "train.loggers=[wandb]"]) == 2
    err = capsys.readouterr().err
    assert "train.loggers" in err and "pip install 'lmforge[wandb]'" in err
    assert main(["pretrain", "--config", str(recipe), f"out_dir={tmp_path / 'run'}", "train.loggers=[tensorbord]"]) == 2
    err = capsys.readouterr().err
    assert "train.loggers" in err and "tensorboard" in err
    assert not (tmp_path / "run").exists()
