"""rlsys submit / rlsys jobs (rlsys/cluster/jobs.py) and run storage at a URI (rlsys/cluster/storage.py).

Unit tests check the job's runtime environment and the refusals before anything is submitted; the
integration test (marked multinode) submits real runs to a two-node cluster of `ray start`
processes on this machine with Ray's token authentication ON, follows, lists and stops them. The
cluster is stopped by killing its process groups, never with `ray stop` (which stops every Ray
process on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from rlsys.actors.generator import engine_env
from rlsys.cluster import jobs
from rlsys.cluster.storage import RunStorage, StorageError, is_uri
from rlsys.config import ConfigError, load_config, to_yaml

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
    # The job loads exactly the config validated here.
    assert variables[jobs.CONFIG_ENV] == to_yaml(cfg)
    monkeypatch.setenv(jobs.CONFIG_ENV, variables[jobs.CONFIG_ENV])
    assert jobs.load_shipped_config(jobs.CONFIG_ENV) == cfg
    assert jobs.ENTRYPOINT == f"python -m rlsys.cli train --config-env {jobs.CONFIG_ENV}"


def test_runtime_env_uv_and_image():
    env = jobs.runtime_env(_cfg("submit.uv=[vllm]", "submit.image_uri=rayproject/ray:2.60.0-gpu"), REPO)
    assert env["uv"] == ["vllm"] and env["image_uri"] == "rayproject/ray:2.60.0-gpu" and "pip" not in env


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
    def __init__(self, statuses=("SUCCEEDED",)):
        self.submitted, self.statuses = [], list(statuses)

    def submit_job(self, **kwargs):
        self.submitted.append(kwargs)
        return kwargs.get("submission_id") or "raysubmit_fake"

    def get_job_info(self, job_id):
        state = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return SimpleNamespace(status=state, message="it ended" if state == "FAILED" else None)

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


def test_list_has_one_line_per_job():
    long = "python -m rlsys.cli train --config-env RLSYS_SUBMITTED_CONFIG and much more text after it"
    fake = SimpleNamespace(list_jobs=lambda: [
        SimpleNamespace(submission_id="b", job_id="02", status="RUNNING", start_time=2_000_000, entrypoint="x"),
        SimpleNamespace(submission_id=None, job_id="01", status="SUCCEEDED", start_time=1_000_000, entrypoint=long)])
    first, second = jobs.list_lines(fake)
    assert first.startswith("01  SUCCEEDED  1970-01-01 ") and first.endswith(long[:57] + "...")
    assert second.startswith("b  RUNNING  ") and second.endswith("  x")


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
