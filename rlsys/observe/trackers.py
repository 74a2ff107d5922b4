"""Experiment trackers beside metrics.jsonl: TensorBoard, Weights & Biases, MLflow (`trainer.loggers`).

Every tracker has the same four calls, made by RunLog on the driver:
  log_config(config)           once at start: the resolved config as a nested dict
  log(step, metrics, sample)   each step: the metrics under metrics.jsonl's names, already
                               through `plottable`, and the step's sample (prompt, completion,
                               answer, reward)
  close()

Metric values: trackers plot numbers, while metrics.jsonl takes any JSON value. `plottable`
(called by RunLog once per step, for all trackers) decides what reaches a tracker: real numbers
(bool as 0/1, numpy scalars too) are passed on as floats, NaN and ±inf included (a loss that
turns NaN must show in the dashboard, not vanish; TensorBoard and W&B keep them as they are,
MLflow's database stores ±inf as ±1.8e308); anything else (None, a string, a list) is left out
for that step, with one warning per metric name, and stays in metrics.jsonl. So a tracker never
gets a value it would reject in the middle of a run.

The tracker packages are imported only when their logger is selected: they are the optional
extra `track` (pip install 'rlsys[track]').
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import re
import sys
import time
from importlib import import_module
from pathlib import Path

from rlsys.config import redact_args

log = logging.getLogger(__name__)

SAMPLE_COLUMNS = ("step", "prompt", "completion", "answer", "reward")


def require(logger: str, module: str):
    """Import a tracker's package; when it is missing, say which logger needs it and how to get it."""
    try:
        return import_module(module)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"trainer.loggers has {logger!r}, but its package is not installed ({e}); "
            f"install the tracking extra: pip install 'rlsys[track]' (or ./dev.sh setup cpu,test,track)"
        ) from e


def plottable(metrics: dict, warned: set[str]) -> dict[str, float]:
    """The metrics a tracker can plot, as floats (see the module docstring); warns once per name
    (remembered in `warned`) about each one left out."""
    out = {}
    for name, value in metrics.items():
        if isinstance(value, numbers.Real):   # bool is one: True -> 1.0
            out[name] = float(value)
        elif name not in warned:
            warned.add(name)
            log.warning("metric %r is %s, not a number: left out of the trackers (it stays in "
                        "metrics.jsonl)", name, type(value).__name__)
    return out


def flatten(config: dict, prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested config -> {"model.name": ..., "algo.lr": ...}: what hyper-parameter tables take.
    Leaves that are not a scalar (None, lists, empty dicts) become their JSON text."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


def sample_markdown(step: int, sample: dict) -> str:
    """The step's sample as Markdown for TensorBoard's text tab (it has no table type)."""
    fence = "~~~~"   # not ``` : a completion may contain its own code fences
    return (f"**step** {step} · **reward** {sample['reward']} · **answer** `{sample['answer']}`\n\n"
            f"**prompt**\n\n{fence}\n{sample['prompt']}\n{fence}\n\n"
            f"**completion**\n\n{fence}\n{sample['completion']}\n{fence}\n")


class TensorBoardTracker:
    """Event files in <run_dir>/tensorboard: scalars, the config as hparams and as YAML text,
    one text entry per step for the sample."""

    def __init__(self, run_dir: Path, trainer_cfg):
        require("tensorboard", "tensorboard")   # torch.utils.tensorboard needs it; name it first
        self.summary = require("tensorboard", "torch.utils.tensorboard.summary")
        self.writer = require("tensorboard", "torch.utils.tensorboard").SummaryWriter(
            log_dir=str(run_dir / "tensorboard"))

    def log_config(self, config: dict) -> None:
        # add_hparams would write into a new sub-folder (a separate run in TensorBoard's list);
        # the hparams summaries go into this run's own event file instead.
        experiment, session_start, _ = self.summary.hparams(flatten(config), {})
        file_writer = self.writer._get_file_writer()
        file_writer.add_summary(experiment)
        file_writer.add_summary(session_start)
        self.writer.add_text("config", "~~~~yaml\n" + yaml_text(config) + "~~~~", global_step=0)

    def log(self, step: int, metrics: dict, sample: dict) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.add_text("samples", sample_markdown(step, sample), global_step=step)
        self.writer.flush()   # as metrics.jsonl: what was logged is on disk if the run crashes

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run: metrics by step, the config, a one-row wandb.Table per step under "samples".
    WANDB_MODE is left to the user (online needs a login; offline writes, and `wandb sync`
    uploads later); files go under <run_dir>/wandb."""

    def __init__(self, run_dir: Path, trainer_cfg):
        self.wandb = require("wandb", "wandb")
        # W&B keeps the command line (sys.argv, read as init starts the run) in the run's metadata,
        # and `key=value` overrides on it may hold secrets (submit.env_vars={...}): it gets them
        # redacted. It has no setting for that short of dropping all metadata (x_disable_meta).
        argv, sys.argv = sys.argv, sys.argv[:1] + redact_args(sys.argv[1:])
        try:
            self.run = self.wandb.init(project=trainer_cfg.project, name=trainer_cfg.run_name or run_dir.name,
                                       dir=str(run_dir))
        finally:
            sys.argv = argv

    def log_config(self, config: dict) -> None:
        self.run.config.update(config)

    def log(self, step: int, metrics: dict, sample: dict) -> None:
        table = self.wandb.Table(columns=list(SAMPLE_COLUMNS),
                                 data=[[step] + [sample[c] for c in SAMPLE_COLUMNS[1:]]])
        self.run.log({**metrics, "samples": table}, step=step)

    def close(self) -> None:
        self.run.finish()


def mlflow_key(name: str) -> str:
    """A metric name as MLflow accepts it. MLflow keys may hold letters, digits, "_", "-", ".",
    " " and "/" ("reward/mean" stays as it is) and must not look like a path that normalizes to
    another one (leading "/", "//", "." or ".." parts); every other character becomes "_", and
    empty, "." and ".." parts become "_", "_", "__". Colons, allowed on Linux, are mapped too:
    MLflow on Windows rejects them, and the same run should read the same everywhere."""
    name = re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)
    parts = ["_" * len(p) if p in (".", "..") else p or "_" for p in name.split("/")]
    return "/".join(parts)


class MlflowTracker:
    """An MLflow run: metrics by step (names through `mlflow_key`), the config as flat params and
    as config.yaml, the samples as the table artifact samples.parquet (MlflowClient.log_table,
    which appends by reading the table back: from JSON, pandas would turn an answer "2" into the
    number 2; Parquet keeps each column's type).
    Tracking URI: trainer.tracking_uri, else a SQLite database <run_dir>/mlruns/mlflow.db with
    artifacts in <run_dir>/mlruns/artifacts (MLflow 3 refuses its old file store unless
    MLFLOW_ALLOW_FILE_STORE is set; a database needs no such opt-in)."""

    def __init__(self, run_dir: Path, trainer_cfg):
        # log_table appends by downloading the table first, with a progress bar per step that
        # would cut through the training progress bar; a user's own setting wins.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        require("mlflow", "pandas")   # MlflowClient.log_table builds a DataFrame
        mlflow = require("mlflow", "mlflow")
        self.entities = require("mlflow", "mlflow.entities")
        artifact_location = None
        if trainer_cfg.tracking_uri:
            uri = trainer_cfg.tracking_uri
        else:
            (run_dir / "mlruns").mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{(run_dir / 'mlruns' / 'mlflow.db').resolve()}"
            # without it, a database store puts artifacts in ./mlruns of the working directory
            artifact_location = (run_dir / "mlruns" / "artifacts").resolve().as_uri()
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(trainer_cfg.project)
        experiment_id = (experiment.experiment_id if experiment is not None else
                         self.client.create_experiment(trainer_cfg.project, artifact_location=artifact_location))
        self.run_id = self.client.create_run(experiment_id,
                                             run_name=trainer_cfg.run_name or run_dir.name).info.run_id
        self.keys: dict[str, str] = {}   # mapped key -> the metric name that took it

    def key(self, name: str) -> str:
        key = mlflow_key(name)
        if self.keys.setdefault(key, name) != name:
            raise ValueError(f"metrics {self.keys[key]!r} and {name!r} both become the MLflow key {key!r}; "
                             f"rename one of them")
        return key

    def log_config(self, config: dict) -> None:
        Param = self.entities.Param
        params = [Param(key, str(value)) for key, value in flatten(config).items()]
        for i in range(0, len(params), 100):   # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_text(self.run_id, yaml_text(config), "config.yaml")

    def log(self, step: int, metrics: dict, sample: dict) -> None:
        now = int(time.time() * 1000)
        batch = [self.entities.Metric(self.key(name), value, now, step)
                 for name, value in metrics.items()]
        for i in range(0, len(batch), 1000):   # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])
        row = {"step": [step], **{c: [sample[c]] for c in SAMPLE_COLUMNS[1:]}}
        self.client.log_table(self.run_id, data=row, artifact_file="samples.parquet")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def yaml_text(config: dict) -> str:
    from omegaconf import OmegaConf
    return OmegaConf.to_yaml(OmegaConf.create(config))


def make_tracker(name: str, run_dir: Path, trainer_cfg):
    kinds = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}
    if name not in kinds:
        raise ValueError(f"trainer.loggers: unknown tracker {name!r}; choose from jsonl, {', '.join(kinds)}")
    return kinds[name](run_dir, trainer_cfg)
