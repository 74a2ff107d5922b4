"""Secrets given to a run are in nothing it writes or logs: a real `rlsys train` of the tiny config,
2 steps, every tracker on (TensorBoard, MLflow, W&B offline), a checkpoint at each step, the
profile timeline, and the run folder at a storage URI (file://); then every file of the staging
folder, the storage copy and the trackers' home folders (W&B keeps caches outside the run folder)
is read as bytes, and the run's terminal output too, for each secret value.

The values go where a job's would: into submit.env_vars (so the config holds them, under
secret-named and plain keys alike), and into the run's own environment (a submitted job gets
submit.env_vars as environment variables, and so does every library the run imports).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from rlsys.config import REDACTED, load_config

REPO = Path(__file__).resolve().parent.parent
SECRETS = {"WANDB_API_KEY": "s3cr3t-wandb-9f3c1d", "MY_TOKEN": "s3cr3t-token-2b7e44",
           "AWS_SECRET_ACCESS_KEY": "s3cr3t-aws-81d0aa", "PLAIN_SETTING": "s3cr3t-plain-4c19e2"}
IN_ENVIRONMENT = ("MY_TOKEN", "AWS_SECRET_ACCESS_KEY", "PLAIN_SETTING")
"""WANDB_API_KEY stays out of the run's environment: W&B would take it for a login."""


def _hits(root: Path) -> list[str]:
    """'path: SECRET_NAME' for every file under root that holds a secret's value."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        data = path.read_bytes()
        found += [f"{path}: {name}" for name, value in SECRETS.items() if value.encode() in data]
    return found


def test_no_file_of_a_run_and_no_line_it_prints_holds_a_secret(tmp_path):
    out, home = tmp_path / "bucket" / "run", tmp_path / "home"
    home.mkdir()
    env_vars = "submit.env_vars={" + ", ".join(f"{k}: {v}" for k, v in SECRETS.items()) + "}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HOME": str(home), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           **{name: SECRETS[name] for name in IN_ENVIRONMENT}}
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("rlsys")), "train", "configs/tiny.yaml", "trainer.total_steps=2",
         "trainer.save_every=1", f"trainer.output_dir=file://{out}", "trainer.loggers=[jsonl,tensorboard,mlflow,wandb]",
         "trainer.progress=false", "profile.enabled=true", env_vars],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    staged = Path(re.search(r"\[rlsys\] run folder: (\S+)", proc.stdout).group(1))

    # The run wrote what it always writes, into every place scanned below.
    assert (out / "checkpoints" / "step_2" / "trainer_state.json").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "mlruns" / "mlflow.db").is_file() and list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert (out / "timeline.json").is_file()
    # The config it wrote names the variables, not their values; it still loads.
    assert load_config(out / "config.yaml").submit.env_vars == {name: REDACTED for name in SECRETS}

    scanned = [out, home, staged]  # the staging folder on the driver's disk stays after the run
    assert staged.is_dir()
    hits = [hit for root in scanned for hit in _hits(root)]
    hits += [f"{stream}: {name}" for stream, text in (("stdout", proc.stdout), ("stderr", proc.stderr))
             for name, value in SECRETS.items() if value in text]
    assert not hits, "secret values written or printed:\n" + "\n".join(hits)
    assert sum(1 for p in out.rglob("*") if p.is_file()) > 20  # the scan saw the whole run, not an empty folder
    shutil.rmtree(staged)  # the staging copy under $RLSYS_CACHE is this test's own
