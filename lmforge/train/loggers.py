"""Experiment trackers beside the run's own record, `metrics.jsonl` (always written: resume and
report.md read it). A stage lists them as `train.loggers` (PPO: `ppo.loggers`), e.g.
`train.loggers=[jsonl,tensorboard]`; the main process sends each tracker every numeric metric of a
record at its `step`, the configuration once as hyperparameters (flattened to dotted keys), and
each plot (PNG) at the step it was drawn, as `plots/<name>`.

- `tensorboard`: event files under `<out_dir>/tensorboard/` (`tensorboard --logdir <out_dir>/tensorboard`):
  scalars, the configuration in the HParams tab, plots in the Images tab. A resumed run purges the
  events logged after its checkpoint.
- `wandb`: a W&B run in `<out_dir>/wandb/`, project `WANDB_PROJECT` (default "lmforge"), named after
  the out_dir. `WANDB_MODE` decides online or offline; unset, the run is online only when an API key is
  configured (`WANDB_API_KEY` or `wandb login`) and offline otherwise (`wandb sync` uploads it later).
- `mlflow`: a run at `MLFLOW_TRACKING_URI`, or else in a SQLite store inside the run directory
  (`mlflow ui --backend-store-uri sqlite:///<out_dir>/mlflow.db`), experiment `MLFLOW_EXPERIMENT_NAME`
  (default "lmforge"); plots as images with their step.

W&B and MLflow run ids are kept in `<out_dir>/trackers.json`, so that `--resume` continues the same
run; what a killed run logged there after its last checkpoint stays (neither can delete history)."""

from __future__ import annotations

import importlib.util
import json
import netrc
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

import numpy as np
from pydantic import AfterValidator, BaseModel

LoggerName = Literal["jsonl", "tensorboard", "wandb", "mlflow"]
RUN_IDS = "trackers.json"


def installed(names: list[LoggerName]) -> list[LoggerName]:
    """`names` once each, after checking that every tracker's package is installed (found, not imported)."""
    for name in names:  # each tracker's package, and lmforge's extra for it, has the tracker's name
        if name != "jsonl" and importlib.util.find_spec(name) is None:
            raise ValueError(f"the {name} logger needs its package: pip install 'lmforge[{name}]'")
    return list(dict.fromkeys(names))


Loggers = Annotated[list[LoggerName], AfterValidator(installed)]
LOGGERS_HELP = ("experiment trackers to log to: jsonl (metrics.jsonl, always written), tensorboard, wandb, mlflow "
                "(see lmforge.train.loggers)")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as one level of dotted keys: {"train": {"lr": 1}} -> {"train.lr": 1}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def param_text(value: Any) -> str:
    """A configuration value as a tracker's text parameter: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics of a metrics-log record (its step and any text or lists left out)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def read_png(path: Path) -> np.ndarray:
    """An image file as RGB pixels (height, width, 3), uint8."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def image_key(path: Path) -> str:
    """The name a plot is logged under: `plots/<file stem>` (apart from the metrics, which may share the stem)."""
    return f"plots/{path.stem}"


def run_id(run_dir: Path, name: str, resumed: bool) -> str | None:
    """The tracker run a resumed run continues, as stored by `save_run_id` (None for a new run)."""
    path = run_dir / RUN_IDS
    return json.loads(path.read_text()).get(name) if resumed and path.is_file() else None


def save_run_id(run_dir: Path, name: str, value: str) -> None:
    path = run_dir / RUN_IDS
    ids = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps(ids | {name: value}, indent=1) + "\n")


class Tracker:
    """One experiment tracker of a run; used as a context manager, it closes when the run ends
    (marked failed when it ends by an exception)."""

    def log_config(self, config: dict[str, Any]) -> None:
        """Record the run's configuration (nested, JSON values) as hyperparameters."""
        raise NotImplementedError

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_image(self, path: Path, step: int) -> None:
        """Record the PNG at `path` under its `image_key`."""
        raise NotImplementedError

    def close(self, failed: bool) -> None:
        raise NotImplementedError

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind: Any, *_: Any) -> None:
        self.close(failed=kind is not None)


class TensorBoardTracker(Tracker):
    def __init__(self, run_dir: Path, resumed_at: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # The checkpoint's own step was logged before it was saved and stays; everything after it is purged.
        purge = None if resumed_at is None else resumed_at + 1
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)

    def log_config(self, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        values = {k: v if isinstance(v, (int, float)) and not isinstance(v, bool) else param_text(v)
                  for k, v in flatten(config).items()}
        # Only the session's start, in this run's own event file: TensorBoard's HParams tab then finds
        # the metrics among its scalars (add_hparams would write a separate run of its own).
        _, session_start, _ = hparams(values, {})
        self.writer.file_writer.add_summary(session_start)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_image(self, path: Path, step: int) -> None:
        self.writer.add_image(image_key(path), read_png(path), step, dataformats="HWC")

    def close(self, failed: bool) -> None:
        self.writer.close()


def wandb_mode() -> str:
    """`WANDB_MODE` when set; otherwise online with an API key (`WANDB_API_KEY`, or the netrc entry
    `wandb login` writes) and offline without one."""
    if mode := os.environ.get("WANDB_MODE"):
        return mode
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        logged_in = netrc.netrc().authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        logged_in = False
    return "online" if os.environ.get("WANDB_API_KEY") or logged_in else "offline"


class WandbTracker(Tracker):
    def __init__(self, run_dir: Path, resumed_at: int | None) -> None:
        import wandb

        self.run = wandb.init(dir=run_dir, project=os.environ.get("WANDB_PROJECT") or "lmforge", name=run_dir.name,
                              id=run_id(run_dir, "wandb", resumed_at is not None), resume="allow", mode=wandb_mode())
        save_run_id(run_dir, "wandb", self.run.id)

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_image(self, path: Path, step: int) -> None:
        import wandb

        self.run.log({image_key(path): wandb.Image(str(path))}, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=int(failed))


class MLflowTracker(Tracker):
    def __init__(self, run_dir: Path, resumed_at: int | None) -> None:
        from mlflow import MlflowClient

        local = not os.environ.get("MLFLOW_TRACKING_URI")
        run_dir = run_dir.resolve()
        self.client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}" if local else None)
        self.run_id = run_id(run_dir, "mlflow", resumed_at is not None)
        if self.run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "lmforge"
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
                name, artifact_location=(run_dir / "mlartifacts").as_uri() if local else None)
            self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
            save_run_id(run_dir, "mlflow", self.run_id)
        else:
            self.client.update_run(self.run_id, status="RUNNING")

    def log_config(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        params = [Param(k, param_text(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in flatten(config).items()]
        for start in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[start : start + MAX_PARAMS_TAGS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_image(self, path: Path, step: int) -> None:
        self.client.log_image(self.run_id, read_png(path), key=image_key(path), step=step, synchronous=True)

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


TRACKERS: dict[str, type[Tracker]] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker,
                                      "mlflow": MLflowTracker}


@contextmanager
def open_trackers(names: list[LoggerName], run_dir: Path, config: BaseModel,
                  resumed_at: int | None = None) -> Iterator[list[Tracker]]:
    """The trackers `names` (jsonl needs none) of the run in `run_dir`, open while the context lasts;
    a new run (`resumed_at` None) logs `config` to them, a resumed one continues their runs."""
    names = [name for name in names if name in TRACKERS]
    if names:
        run_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        trackers = [stack.enter_context(TRACKERS[name](run_dir, resumed_at)) for name in names]
        if resumed_at is None:
            for tracker in trackers:
                tracker.log_config(config.model_dump(mode="json"))
        yield trackers
