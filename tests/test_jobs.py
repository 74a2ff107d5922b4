"""rlsys submit / rlsys jobs (rlsys/cluster/jobs.py) and run storage at a URI (rlsys/cluster/storage.py).

Unit tests check the job's runtime environment and the refusals before anything is submitted; the
integration test (marked multinode) submits real runs, from the host's side of the cluster network,
to a two-node cluster of nodes that share nothing (LocalNodes(isolated=True): their own addresses,
/tmp and homes) with Ray's token authentication ON, follows, lists and stops them; it skips where
namespaces are not allowed (isolation.available()).
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from rlsys.actors.generator import engine_env
from rlsys.cluster import jobs
from rlsys.cluster.isolation import available
from rlsys.cluster.local import LocalNodes
from rlsys.cluster.storage import RunStorage, StorageError, is_uri
from rlsys.config import REDACTED, ConfigError, load_config, to_yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TINY = REPO / "configs" / "tiny.yaml"


# ---------------------------------------------------------------- the job's runtime environment

def _cfg(*overrides: str):
    return load_config(TINY, ["trainer.output_dir=/shared/runs/x", *overrides])


def test_project_dir_is_the_checkout_that_holds_rlsys():
    assert jobs.project_dir() == REPO


def test_runtime_env_ships_the_project_the_engines_variables_and_the_merged_config(monkeypatch):
    cfg = _cfg("submit.pip=[rlsys-extra==1.0]", "submit.excludes=[big/, '*.bin']",
               "submit.env_vars={HF_HOME: /data/hf}", "generator.kv_cache_gib=3", "algo.beta=0.5")
    env = jobs.runtime_env(cfg, REPO)
    assert env["working_dir"] == str(REPO)
    assert env["excludes"] == [".git", ".venv", "runs/", ".cache/", "benchmarks/results/", "__pycache__",
                               "*.egg-info", "big/", "*.bin"]
    assert env["pip"] == ["rlsys-extra==1.0"]
    assert "uv" not in env and "image_uri" not in env
    variables = env["env_vars"]
    for key, value in engine_env(cfg.generator).items():
        assert variables[key] == value
    assert variables["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert variables["HF_HOME"] == "/data/hf"
    assert variables["PYTHONUNBUFFERED"] == "1"
    assert not any(k.startswith("RAY_AUTH") for k in variables)
    assert all(isinstance(v, str) for v in variables.values())  # Ray's env_vars take strings only
    json.dumps(env)  # travels as JSON
    # The job loads exactly the config validated here, its env_vars' values redacted (the job has
    # them in its environment; nothing it writes holds them).
    assert variables[jobs.CONFIG_ENV] == to_yaml(cfg)
    monkeypatch.setenv(jobs.CONFIG_ENV, variables[jobs.CONFIG_ENV])
    shipped = jobs.load_shipped_config(jobs.CONFIG_ENV)
    assert shipped.submit.env_vars == {"HF_HOME": REDACTED}
    assert dataclasses.replace(shipped, submit=cfg.submit) == cfg
    assert jobs.entrypoint(cfg) == jobs.ENTRYPOINT_IN_ENV == f"python -m rlsys.cli train --config-env {jobs.CONFIG_ENV}"


def test_runtime_env_uv_and_image():
    env = jobs.runtime_env(_cfg("submit.uv=[vllm]", "submit.image_uri=rayproject/ray:2.60.0-gpu"), REPO)
    assert env["uv"] == ["vllm"] and env["image_uri"] == "rayproject/ray:2.60.0-gpu" and "pip" not in env


# ---------------------------------------------------------------- the job's interpreter

def test_the_entrypoint_finds_rays_python_unless_ray_builds_the_job_an_environment():
    assert jobs.entrypoint(_cfg()) == jobs.ENTRYPOINT == jobs.RAY_PYTHON + jobs.TRAIN
    assert jobs.ENTRYPOINT.endswith(f'exec "$RAY_PYTHON" -m rlsys.cli train --config-env {jobs.CONFIG_ENV}')
    for given in ("submit.pip=[x]", "submit.uv=[x]", "submit.image_uri=img"):  # Ray puts that python first on PATH
        assert jobs.entrypoint(_cfg(given)) == f"python -m rlsys.cli train --config-env {jobs.CONFIG_ENV}"


def _run_as_ray_would(tmp_path, worker_command: str | None) -> subprocess.CompletedProcess:
    """The entrypoint run as on a Ray node: `/bin/sh -c ENTRYPOINT` from a job supervisor (a Python
    process) whose parent, the raylet, carries --python_worker_command on its command line; the
    node's PATH starts with a `python` that is not Ray's. No RLSYS_SUBMITTED_CONFIG: the shipped
    rlsys starts (its imports work) and stops at once, naming the variable."""
    wrong = tmp_path / "bin"
    wrong.mkdir()
    (wrong / "python").write_text("#!/bin/sh\necho 'the python on PATH ran' >&2\nexit 3\n")
    (wrong / "python").chmod(0o755)
    env = {"PATH": f"{wrong}:/usr/bin:/bin", "HOME": str(tmp_path), "RLSYS_CACHE": str(tmp_path / "cache")}
    supervisor = [sys.executable, "-c", "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1], shell=True)"
                                        ".returncode)", jobs.ENTRYPOINT]
    raylet = [sys.executable, "-c", "import subprocess, sys, json; sys.exit(subprocess.run(json.loads(sys.argv[1]))"
                                    ".returncode)", json.dumps(supervisor), "--raylet_socket_name=/tmp/x"]
    if worker_command is not None:
        raylet.append(f"--python_worker_command={worker_command}")
    return subprocess.run(raylet, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_the_job_runs_the_python_the_raylet_starts_workers_with_whatever_the_path(tmp_path):
    proc = _run_as_ray_would(tmp_path, f"{sys.executable} /ray/_private/workers/setup_worker.py "
                                       f"/ray/_private/workers/default_worker.py --node-ip-address=10.0.0.1")
    assert "the python on PATH ran" not in proc.stderr
    assert proc.returncode == 2, proc.stderr
    assert f"--config-env {jobs.CONFIG_ENV}: no such environment variable" in proc.stderr  # rlsys.cli ran


def test_a_node_whose_rays_python_cannot_be_found_stops_the_job_saying_so(tmp_path):
    proc = _run_as_ray_would(tmp_path, None)
    assert proc.returncode == 127, proc.stderr
    assert "rlsys: cannot tell which Python this node's Ray runs on" in proc.stderr
    assert "--python_worker_command=" in proc.stderr and "submit.pip" in proc.stderr
    assert "the python on PATH ran" not in proc.stderr


@pytest.mark.parametrize("out", ["runs/x", "x", "~/runs/x", "./runs/x"])
def test_relative_output_dir_is_refused(out):
    with pytest.raises(ConfigError, match=r"trainer.output_dir=.* is relative.*absolute path on storage.*s3://"):
        jobs.check_submittable(load_config(TINY, [f"trainer.output_dir={out}"]), REPO)


@pytest.mark.parametrize("out", ["/shared/runs/x", "s3://bucket/runs/x", "gs://b/r", "file:///shared/r"])
def test_absolute_or_uri_output_dir_is_accepted(out):
    jobs.check_submittable(load_config(TINY, [f"trainer.output_dir={out}"]), REPO)


def test_data_path_outside_the_shipped_project_is_refused(tmp_path, monkeypatch):
    (tmp_path / "mine.jsonl").write_text('{"prompt": "1", "answer": "1"}\n')
    monkeypatch.chdir(tmp_path)  # it exists here, but the job resolves it in the project's copy
    with pytest.raises(ConfigError, match=r"data.path=mine.jsonl is relative and not a file in the shipped project"):
        jobs.check_submittable(_cfg("data.path=mine.jsonl"), REPO)
    jobs.check_submittable(_cfg(f"data.path={tmp_path / 'mine.jsonl'}"), REPO)
    jobs.check_submittable(_cfg("data.path=configs/data/toy_digits.jsonl"), REPO)


def test_secrets_reach_the_jobs_environment_but_not_the_shipped_config(monkeypatch):
    given = {"WANDB_API_KEY": "s3cr3t-wandb-0d9f", "MY_TOKEN": "s3cr3t-token-77aa",
                "AWS_SECRET_ACCESS_KEY": "s3cr3t-aws-5c1e"}
    cfg = _cfg("submit.env_vars={" + ", ".join(f"{k}: {v}" for k, v in given.items()) + "}", "algo.beta=0.5")
    variables = jobs.runtime_env(cfg, REPO)["env_vars"]
    for key, value in given.items():
        assert variables[key] == value  # the job's driver and actors get the real values
        assert value not in variables[jobs.CONFIG_ENV]
    monkeypatch.setenv(jobs.CONFIG_ENV, variables[jobs.CONFIG_ENV])
    shipped = jobs.load_shipped_config(jobs.CONFIG_ENV)  # redacted values still load in the job
    assert shipped.submit.env_vars == {key: REDACTED for key in given}
    assert shipped.algo.beta == 0.5 and shipped.trainer.output_dir == "/shared/runs/x"


def test_auth_variables_are_not_shipped():
    with pytest.raises(ConfigError, match=r"submit.env_vars: \['RAY_AUTH_TOKEN'\]"):
        jobs.check_submittable(_cfg("submit.env_vars={RAY_AUTH_TOKEN: abc}"), REPO)


def test_address_comes_from_the_option_then_the_environment(monkeypatch):
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(jobs.JobError, match=r"no cluster address: pass --address http://HEAD:8265"):
        jobs.resolve_address(None)
    monkeypatch.setenv("RAY_ADDRESS", "http://b:8265")
    assert jobs.resolve_address(None) == "http://b:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://a:8265")
    assert jobs.resolve_address(None) == "http://a:8265"
    assert jobs.resolve_address("http://c:8265") == "http://c:8265"


def test_cli_without_an_address_says_how_to_give_one(monkeypatch, capsys):
    from rlsys.cli import main

    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert main(["jobs", "status", "raysubmit_x"]) == 2
    assert "no cluster address: pass --address" in capsys.readouterr().err
    assert main(["submit", str(TINY), "trainer.output_dir=/shared/x"]) == 2
    assert "no cluster address" in capsys.readouterr().err


class FakeClient:
    def __init__(self, statuses=("SUCCEEDED",), message="it ended", logs=""):
        self.submitted, self.statuses, self.message, self.logs = [], list(statuses), message, logs

    def submit_job(self, **kwargs):
        self.submitted.append(kwargs)
        return kwargs.get("submission_id") or "raysubmit_fake"

    def get_job_info(self, job_id):
        state = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return SimpleNamespace(status=state, message=self.message if state == "FAILED" else None)

    def get_job_logs(self, job_id):
        return self.logs

    async def tail_job_logs(self, job_id):
        for chunk in ("line 1\n", "line 2\n"):
            yield chunk


def test_submit_sends_the_validated_config_and_prints_how_to_follow(monkeypatch, capsys):
    fake = FakeClient()
    monkeypatch.setattr(jobs, "client", lambda address: fake)
    job_id = jobs.submit(TINY, ["trainer.output_dir=/shared/runs/t", "trainer.total_steps=7"], "http://h:8265/",
                         submission_id="my-run")
    assert job_id == "my-run"
    (call,) = fake.submitted
    assert call["entrypoint"] == jobs.ENTRYPOINT and call["submission_id"] == "my-run"
    shipped = call["runtime_env"]["env_vars"][jobs.CONFIG_ENV]
    assert shipped == to_yaml(load_config(TINY, ["trainer.output_dir=/shared/runs/t", "trainer.total_steps=7"]))
    out = capsys.readouterr().out
    assert "submitted job my-run" in out
    assert "http://h:8265/#/jobs/my-run" in out
    assert "rlsys jobs logs my-run --follow" in out


def test_base_dir_resolves_a_relative_run_folder_before_it_is_shipped(monkeypatch, tmp_path, capsys):
    fake = FakeClient()
    monkeypatch.setattr(jobs, "client", lambda address: fake)
    jobs.submit(TINY, [], "http://h:8265", base_dir=tmp_path)  # tiny.yaml's runs/tiny
    jobs.submit(TINY, ["trainer.output_dir=s3://b/r"], "http://h:8265", base_dir=tmp_path)
    shipped = [c["runtime_env"]["env_vars"][jobs.CONFIG_ENV] for c in fake.submitted]
    monkeypatch.setenv(jobs.CONFIG_ENV, shipped[0])
    assert jobs.load_shipped_config(jobs.CONFIG_ENV).trainer.output_dir == str(tmp_path / "runs" / "tiny")
    monkeypatch.setenv(jobs.CONFIG_ENV, shipped[1])
    assert jobs.load_shipped_config(jobs.CONFIG_ENV).trainer.output_dir == "s3://b/r"


def test_a_bad_config_stops_before_the_cluster_is_contacted(monkeypatch):
    def no_client(address):
        raise AssertionError("the cluster was contacted")

    monkeypatch.setattr(jobs, "client", no_client)
    with pytest.raises(ConfigError, match="learner.lrr"):
        jobs.submit(TINY, ["trainer.output_dir=/shared/x", "learner.lrr=1"], "http://h:8265")
    with pytest.raises(ConfigError, match="is relative"):
        jobs.submit(TINY, [], "http://h:8265")  # tiny.yaml's runs/tiny


def test_follow_streams_the_logs_and_returns_the_final_status(capsys):
    import io

    out = io.StringIO()
    assert jobs.follow(FakeClient(["RUNNING", "FAILED"]), "j", out=out) == "FAILED"
    assert out.getvalue() == "line 1\nline 2\n"


def test_submit_follow_exits_1_when_the_job_failed(monkeypatch, capsys):
    from rlsys.cli import main

    fake = FakeClient(["FAILED"])
    monkeypatch.setattr(jobs, "client", lambda address: fake)
    assert main(["submit", str(TINY), "trainer.output_dir=/shared/x", "--address", "http://h:8265", "--follow"]) == 1
    assert "job raysubmit_fake: FAILED" in capsys.readouterr().out
    fake.statuses = ["SUCCEEDED"]
    assert main(["submit", str(TINY), "trainer.output_dir=/shared/x", "--address", "http://h:8265", "--follow"]) == 0


def test_status_prints_the_word_then_the_message(monkeypatch, capsys):
    from rlsys.cli import main

    monkeypatch.setattr(jobs, "client", lambda address: FakeClient(["FAILED"]))
    assert main(["jobs", "status", "j", "--address", "http://h:8265"]) == 0
    assert capsys.readouterr().out == "FAILED\nit ended\n"


# What Ray 2.60's job supervisor records for a driver that exits non-zero: the reason, then the log's tail.
DRIVER_LOG = "".join(f"log line {i}\n" for i in range(50)) + (
    "Traceback (most recent call last):\n  File \"<frozen runpy>\", line 198, in _run_module_as_main\n"
    "ModuleNotFoundError: No module named 'omegaconf'\n")
ENTRYPOINT_FAILED = ("Job entrypoint command failed with exit code 1, last available logs (truncated to 20,000 "
                     "chars):\n" + DRIVER_LOG)


def test_a_failed_driver_is_reported_with_the_reason_and_the_logs_last_lines(monkeypatch, capsys):
    from rlsys.cli import main

    fake = FakeClient(["FAILED"], message=ENTRYPOINT_FAILED, logs=DRIVER_LOG)
    monkeypatch.setattr(jobs, "client", lambda address: fake)
    assert main(["jobs", "status", "j", "--address", "http://h:8265"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["FAILED", "Job entrypoint command failed with exit code 1, last available logs (truncated to "
                         "20,000 chars):", "..."]
    assert lines[3:] == DRIVER_LOG.splitlines()[-20:]  # the last 20 lines, once: the message holds the log's tail
    assert lines[-1] == "ModuleNotFoundError: No module named 'omegaconf'"


def test_a_job_that_fails_before_its_driver_starts_is_reported_by_submit_follow(monkeypatch, capsys):
    from rlsys.cli import main

    reason = ("runtime_env setup failed: Failed to set up runtime environment.\nTraceback (most recent call last):\n"
              "  ...\nRuntimeError: Failed to install pip requirements: No matching distribution for rlsys-extra==9")
    fake = FakeClient(["RUNNING", "FAILED"], message=reason, logs="Runtime env is setting up.\n")
    fake.tail_job_logs = lambda job_id: _no_lines()
    monkeypatch.setattr(jobs, "client", lambda address: fake)
    assert main(["submit", str(TINY), "trainer.output_dir=/shared/x", "--address", "http://h:8265", "--follow"]) == 1
    out = capsys.readouterr().out
    assert out.split("job raysubmit_fake: FAILED\n", 1)[1].splitlines() == [
        *reason.splitlines(), "last lines of the job's log:", "Runtime env is setting up."]


async def _no_lines():
    for chunk in ():
        yield chunk


def test_why_failed_says_when_there_is_nothing_to_show():
    assert jobs.why_failed(FakeClient(logs=""), "j", None) == ["(Ray gave no message and the job's log is empty)"]


def test_list_has_one_line_per_job():
    long = "python -m rlsys.cli train --config-env RLSYS_SUBMITTED_CONFIG and much more text after it"
    fake = SimpleNamespace(list_jobs=lambda: [
        SimpleNamespace(submission_id="b", job_id="02", status="RUNNING", start_time=2_000_000, entrypoint="x"),
        SimpleNamespace(submission_id=None, job_id="01", status="SUCCEEDED", start_time=1_000_000, entrypoint=long)])
    first, second = jobs.list_lines(fake)
    assert first.startswith("01  SUCCEEDED  1970-01-01 ") and first.endswith(long[:57] + "...")
    assert second.startswith("b  RUNNING  ") and second.endswith("  x")
    mine = SimpleNamespace(list_jobs=lambda: [SimpleNamespace(submission_id="c", job_id="03", status="RUNNING",
                                                              start_time=3_000_000, entrypoint=jobs.ENTRYPOINT)])
    (line,) = jobs.list_lines(mine)  # the command, not the shell line that finds its Python
    assert line.endswith("  $RAY_PYTHON -m rlsys.cli train --config-env RLSYS_SUBMITT...")


def test_an_auth_refusal_says_where_ray_looks_for_the_token():
    from ray.exceptions import AuthenticationError

    with pytest.raises(jobs.JobError) as e:
        with jobs._RayErrors("http://h:8265"):
            raise AuthenticationError("Authentication required: Unauthorized")
    text = str(e.value)
    assert "the cluster at http://h:8265 refused the request" in text
    for where in ("RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token"):
        assert where in text


def test_train_config_env_takes_no_other_config(monkeypatch, capsys):
    from rlsys.cli import main

    monkeypatch.delenv("RLSYS_NOPE", raising=False)
    assert main(["train", "--config-env", "RLSYS_NOPE"]) == 2
    assert "--config-env RLSYS_NOPE: no such environment variable" in capsys.readouterr().err
    monkeypatch.setenv("RLSYS_NOPE", "trainer: {total_steps: 1}")
    assert main(["train", "--config-env", "RLSYS_NOPE", "trainer.total_steps=2"]) == 2
    assert "no CONFIG or overrides beside it" in capsys.readouterr().err
    monkeypatch.setenv("RLSYS_NOPE", "learner: {lrr: 1}")
    with pytest.raises(ConfigError, match="learner.lrr"):
        jobs.load_shipped_config("RLSYS_NOPE")


# ---------------------------------------------------------------- run storage at a URI

def test_is_uri():
    for uri in ("s3://bucket/x", "gs://b/x", "hdfs://nn:8020/x", "file:///tmp/x", "mock:///a"):
        assert is_uri(uri), uri
    for path in ("/tmp/x", "runs/x", "~/x", "C:/x", "s3:/x", ""):
        assert not is_uri(path), path


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_upload_copies_new_and_changed_files_and_skips_partial_checkpoints(tmp_path):
    local, dest = tmp_path / "run", tmp_path / "bucket" / "runs" / "a"
    (local / "checkpoints" / "step_1").mkdir(parents=True)
    (local / "metrics.jsonl").write_bytes(b'{"step": 0}\n')
    (local / "samples.jsonl").write_bytes(b'{"s": 1}\n')
    (local / "checkpoints" / "step_1" / "model.safetensors").write_bytes(bytes(range(256)) * 1000)
    partial = local / "checkpoints" / "step_2.partial"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    storage = RunStorage(f"file://{dest}", local)
    assert not storage.holds_run()
    assert sorted(storage.upload()) == ["checkpoints/step_1/model.safetensors", "metrics.jsonl", "samples.jsonl"]
    assert storage.holds_run()
    assert _files(dest) == {k: v for k, v in _files(local).items() if ".partial" not in k}
    assert storage.upload() == []  # nothing changed
    with open(local / "metrics.jsonl", "ab") as f:  # the next step
        f.write(b'{"step": 1}\n')
    partial.rename(local / "checkpoints" / "step_2")  # the checkpoint is complete
    assert sorted(storage.upload()) == ["checkpoints/step_2/model.safetensors", "metrics.jsonl"]
    assert _files(dest) == _files(local)
    assert (dest / "metrics.jsonl").read_bytes() == b'{"step": 0}\n{"step": 1}\n'
    # Same size, new mtime (rewritten in place): copied again.
    (local / "samples.jsonl").write_bytes(b'{"s": 2}\n')
    os.utime(local / "samples.jsonl", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert storage.upload() == ["samples.jsonl"]
    assert (dest / "samples.jsonl").read_bytes() == b'{"s": 2}\n'
    assert not [p for p in dest.rglob("*") if ".partial" in p.name]  # no temporary files left


def test_upload_to_pyarrows_mock_filesystem(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "metrics.jsonl").write_bytes(b"m\n")
    (tmp_path / "ck" / "w.bin").write_bytes(b"\x00\x01\xff" * 5000)
    storage = RunStorage("mock:///bucket/runs/a", tmp_path)
    assert not storage.holds_run()
    assert sorted(storage.upload()) == ["ck/w.bin", "metrics.jsonl"]
    assert storage.holds_run()
    for rel in ("metrics.jsonl", "ck/w.bin"):
        with storage.fs.open_input_stream(f"bucket/runs/a/{rel}") as f:
            assert f.read() == (tmp_path / rel).read_bytes()


def test_a_failed_upload_names_the_uri_and_is_retried(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_bytes(b"m\n")
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"")  # a file where the destination's folder should be: unwritable, even for root
    uri = f"file://{blocker}/run"
    storage = RunStorage(uri, tmp_path / "run")
    with pytest.raises(StorageError, match=f"uploading .*metrics.jsonl to {uri}/metrics.jsonl failed"):
        storage.upload()
    blocker.unlink()
    assert storage.upload() == ["metrics.jsonl"]  # not recorded as sent: tried again
    assert (blocker / "run" / "metrics.jsonl").read_bytes() == b"m\n"


def test_storage_refuses_a_plain_path(tmp_path):
    with pytest.raises(StorageError, match="not a storage URI"):
        RunStorage(str(tmp_path), tmp_path)


# ---------------------------------------------------------------- a real two-node cluster, token auth on

TOKEN = secrets.token_hex(32)


def _env(home: Path, token: str | None = TOKEN, **extra: str) -> dict[str, str]:
    """The host's side: token auth on, the token only in RAY_AUTH_TOKEN (HOME is a test folder: no
    ~/.ray/auth_token of whoever runs the tests), the repo's .venv/bin first on PATH, and no Ray
    address or job variables from whoever ran pytest."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_") and k != "RLSYS_BASE_DIR"}
    env |= {"RAY_AUTH_MODE": "token", "HOME": str(home), "PATH": f"{BIN}:{env.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1"}
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    return env | extra


def _two_nodes(folder: Path) -> LocalNodes:
    """A head (0 CPUs, dashboard) and a worker (8 CPUs) that share nothing (their own addresses,
    /tmp and homes: no ~/.ray/auth_token either), token auth on. As Ray's docs start a node from an
    environment that is not activated (`.venv/bin/ray start ...`): the nodes' PATH has no .venv/bin,
    and its first `python` is not Ray's (a folder bound into both nodes)."""
    wrong = folder / "bin"
    wrong.mkdir(parents=True)
    (wrong / "python").write_text("#!/bin/sh\necho 'the python on the node PATH ran' >&2\nexit 3\n")
    (wrong / "python").chmod(0o755)
    nodes = LocalNodes(folder / "nodes", isolated=True,
                       env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN, "PATH": f"{wrong}:/usr/bin:/bin"})
    try:
        nodes.head(shared={wrong: wrong})
        nodes.worker("worker", 8, shared={wrong: wrong})
    except BaseException:
        nodes.stop()
        raise
    return nodes


def _node_logs(nodes: LocalNodes) -> str:
    return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-1500:]}"
                     for p in sorted(nodes.folder.glob("*.log")))


def _rlsys(nodes: LocalNodes, home: Path, *args: str, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    """rlsys on the host's side of the cluster network (its files, the nodes by address)."""
    return subprocess.run(nodes.host_command([str(BIN / "rlsys"), *args]), cwd=home.parent, capture_output=True,
                          text=True, timeout=timeout, env=_env(home, **env))


def _tails(proc) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"


def _submit(nodes: LocalNodes, home: Path, run_dir: str, *extra: str) -> str:
    proc = _rlsys(nodes, home, "submit", str(TINY), "--address", nodes.dashboard, "trainer.progress=false",
                  f"trainer.output_dir={run_dir}", *extra)
    assert proc.returncode == 0, _tails(proc) + _node_logs(nodes)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("submitted job ")), None)
    assert line, _tails(proc)
    job_id = line.split()[-1]
    assert f"{nodes.dashboard}/#/jobs/{job_id}" in proc.stdout, proc.stdout
    return job_id


def _status(nodes: LocalNodes, home: Path, job_id: str) -> str:
    proc = _rlsys(nodes, home, "jobs", "status", job_id, "--address", nodes.dashboard, timeout=120)
    assert proc.returncode == 0, _tails(proc)
    return proc.stdout.splitlines()[0]


def _logs(nodes: LocalNodes, home: Path, job_id: str) -> str:
    proc = _rlsys(nodes, home, "jobs", "logs", job_id, "--address", nodes.dashboard, timeout=120)
    assert proc.returncode == 0, _tails(proc)
    return proc.stdout


@pytest.mark.multinode
@pytest.mark.skipif(available() is not None, reason=str(available()))
def test_submit_follow_list_and_stop_on_a_two_node_cluster_with_token_auth(tmp_path):
    """Submitted from the host's side; the job's driver runs on the head, its run folder on the
    head's own disk (read here through nodes.view)."""
    from rlsys.observe.metrics import read_jsonl

    home = tmp_path / "home"
    home.mkdir()
    nodes = _two_nodes(tmp_path)
    try:
        there = "/tmp/runs/submitted"
        run_dir = nodes.view("head", there)
        # Without the token (no RAY_AUTH_TOKEN, no ~/.ray/auth_token under this HOME): refused, and told where.
        proc = _rlsys(nodes, home, "submit", str(TINY), "--address", nodes.dashboard, f"trainer.output_dir={there}",
                      token=None)
        assert proc.returncode == 2, _tails(proc)
        assert "RAY_AUTH_TOKEN_PATH" in proc.stderr and "~/.ray/auth_token" in proc.stderr, _tails(proc)
        proc = _rlsys(nodes, home, "jobs", "list", "--address", nodes.dashboard, token="not-the-token")
        assert proc.returncode == 2 and "refused the request" in proc.stderr, _tails(proc)
        assert "RAY_AUTH_TOKEN" in proc.stderr, _tails(proc)

        job_id = _submit(nodes, home, there, "trainer.total_steps=2")
        deadline, state = time.time() + 600, None
        while time.time() < deadline:
            state = _status(nodes, home, job_id)
            if state in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(5)
        logs = _logs(nodes, home, job_id)
        assert state == "SUCCEEDED", f"{state}\n{logs[-4000:]}\n{_node_logs(nodes)}"
        assert f"[rlsys] run folder: {there}" in logs, logs[-4000:]
        assert len(read_jsonl(run_dir / "metrics.jsonl")) == 2
        assert (run_dir / "checkpoints" / "step_2" / "model.safetensors").is_file()
        # The job ran exactly the config validated here.
        assert load_config(run_dir / "config.yaml") == load_config(
            TINY, ["trainer.progress=false", f"trainer.output_dir={there}", "trainer.total_steps=2"])
        proc = _rlsys(nodes, home, "jobs", "logs", job_id, "--follow", "--address", nodes.dashboard)
        assert proc.returncode == 0 and f"job {job_id}: SUCCEEDED" in proc.stdout, _tails(proc)
        proc = _rlsys(nodes, home, "jobs", "list", "--address", nodes.dashboard)
        assert proc.returncode == 0, _tails(proc)
        assert any(ln.startswith(f"{job_id}  SUCCEEDED  ") and "rlsys.cli train" in ln
                   for ln in proc.stdout.splitlines()), proc.stdout

        # A long run, followed from submission, stopped once it trains.
        long_there = "/tmp/runs/long"
        long_dir = nodes.view("head", long_there)
        follower = subprocess.Popen(nodes.host_command(
            [str(BIN / "rlsys"), "submit", str(TINY), "--address", nodes.dashboard, "--follow",
             "--submission-id", "rlsys-test-long", "trainer.progress=false", f"trainer.output_dir={long_there}",
             "trainer.total_steps=1000"]), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=_env(home))
        try:
            deadline = time.time() + 600
            while not ((long_dir / "metrics.jsonl").is_file() and (long_dir / "metrics.jsonl").stat().st_size > 0):
                assert follower.poll() is None, f"the follower exited first:\n{follower.stdout.read()[-4000:]}"
                assert time.time() < deadline, "the long run's first step: not within 600s\n" + _node_logs(nodes)
                time.sleep(1.0)
            assert _status(nodes, home, "rlsys-test-long") == "RUNNING"
            proc = _rlsys(nodes, home, "jobs", "stop", "rlsys-test-long", "--address", nodes.dashboard)
            assert proc.returncode == 0 and proc.stdout.strip() == "STOPPED", _tails(proc)
            assert _status(nodes, home, "rlsys-test-long") == "STOPPED"
            out, _ = follower.communicate(timeout=120)
        finally:
            if follower.poll() is None:
                follower.kill()
        assert follower.returncode == 1, out[-4000:]
        assert "[rlsys] run folder:" in out and "job rlsys-test-long: STOPPED" in out, out[-4000:]
    finally:
        nodes.stop()
