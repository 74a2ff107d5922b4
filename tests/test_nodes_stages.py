"""Model folders that exist only on the driver's node reach the actors on nodes that share nothing
(rlsys.data.models.ModelSource): a head, a rollout node and a learner node, each with its own
address, disk, home and cores (rlsys/cluster/isolation.py); jobs submitted from the host's side.

What it proves: `rlsys sample` from a checkpoint folder on the head's disk, run as a Ray job, starts
its engines on the rollout node, which fetches the folder from the head once (two engines, one
copy in its cache) and writes the dataset on the head.

Run alone with `pytest -m multinode tests/test_nodes_stages.py`; skipped where namespaces are not allowed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rlsys.checkpoint import write_checksums
from rlsys.cluster.isolation import available
from rlsys.cluster.local import BIN, LocalNodes, clean_env
from rlsys.config import ModelConfig
from rlsys.data.models import listing_digest, model_files, resolve_model

pytestmark = [pytest.mark.multinode, pytest.mark.skipif(available() is not None, reason=str(available()))]
REPO = Path(__file__).resolve().parent.parent
# generous: a 2-core machine shared with other work
DEADLINES = [f"deadlines.{phase}_s=420" for phase in ("start", "generate", "score", "train", "sync", "save")]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    nodes = LocalNodes(tmp_path_factory.mktemp("nodes"), isolated=True)
    try:
        # Ray's memory monitor reads the whole machine's memory, not a node's: on a machine shared with
        # other work it killed this test's job supervisor and reader at 95%. Off for these nodes.
        nodes.head("--system-config", json.dumps({"memory_monitor_refresh_ms": 0}))
        nodes.worker("rollout", 4, {"rollout": 1}, cores=[0])  # logical CPUs: two 2-CPU engines on one core
        nodes.worker("learner", 4, {"learner": 1}, cores=[1])  # learner ranks and the reward workers
        yield nodes
    finally:
        nodes.stop()


def host(nodes: LocalNodes, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """A command on the host's side of the cluster network."""
    return subprocess.run(nodes.host_command(list(args)), cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=clean_env())


def run_job(nodes: LocalNodes, job: str, command: str, timeout: float = 600) -> str:
    """`command` as a Ray job on the cluster (its driver on the head, in the project folder), submitted
    from the host; waits for it to end and returns its log. A job that does not succeed fails the test."""
    submitted = host(nodes, str(BIN / "ray"), "job", "submit", "--address", nodes.dashboard, "--submission-id", job,
                     "--no-wait", "--", "sh", "-c", f"cd {REPO} && {command}")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    deadline, state = time.time() + timeout, ""
    while time.time() < deadline:
        status = host(nodes, str(BIN / "rlsys"), "jobs", "status", job, "--address", nodes.dashboard)
        assert status.returncode == 0, status.stderr
        state = status.stdout.split()[0]
        if state not in ("PENDING", "RUNNING"):
            break
        time.sleep(3)
    logs = host(nodes, str(BIN / "rlsys"), "jobs", "logs", job, "--address", nodes.dashboard).stdout
    assert state == "SUCCEEDED", f"job {job} {state}:\n{logs[-6000:]}"
    return logs


def cached_models(nodes: LocalNodes, node: str) -> list[Path]:
    root = nodes.view(node, Path.home() / ".cache" / "rlsys" / "models")
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def test_sample_from_a_checkpoint_only_the_head_has(nodes, tmp_path):
    # A checkpoint folder on the head's disk alone (a tiny model of a seed no node builds by itself).
    run_dir = "/tmp/runs/only-on-head"
    step = nodes.view("head", f"{run_dir}/checkpoints/step_1")
    shutil.copytree(resolve_model(ModelConfig(path="tiny", tiny_seed=7), cache_dir=tmp_path), step)
    write_checksums(step)
    digest = listing_digest(model_files(step))
    out = f"{run_dir}/traces.parquet"
    logs = run_job(nodes, "sample-from-head-checkpoint", " ".join([
        str(BIN / "rlsys"), "sample", "configs/tiny.yaml", "--model", run_dir, "--dataset",
        "configs/data/toy_digits.jsonl", "--limit", "4", "--k", "2", "--keep", "all", "--out", out,
        "trainer.progress=false", "generator.num_engines=2", "generator.num_cpus=2", "reward.num_workers=1",
        "cluster.placement=disaggregated", *DEADLINES]))
    rows = pq.read_table(nodes.view("head", out)).to_pylist()
    prov = json.loads(pq.read_schema(nodes.view("head", out)).metadata[b"rlsys"])
    assert prov["counts"]["candidates"] == 8 and len(rows) == prov["counts"]["kept"] > 0, prov["counts"]
    # both engines ran on the rollout node, which fetched the folder once and holds one copy of it
    assert [p.name for p in cached_models(nodes, "rollout")] == [digest]
    assert logs.count(": fetching ") == 1, logs[-4000:]
    assert cached_models(nodes, "learner") == []  # the reward worker loads no model
    assert not Path(run_dir).exists(), "the host should not see the head's disk"


PIPELINE = """
config: configs/tiny.yaml
overrides: [trainer.progress=false, generator.num_engines=1, generator.num_cpus=2, learner.num_ranks=1,
            learner.micro_batch_size=4, reward.num_workers=1, cluster.placement=disaggregated, {deadlines}]
output_dir: {out}
base: tiny
eval: {{enabled: false}}
stages:
  - {{name: traces, kind: sample, model: base, dataset: configs/data/toy_digits.jsonl, limit: 8, k: 2, keep: all}}
  - {{name: cold_start, kind: sft, model: base, data: traces, overrides: [sft.epochs=1, learner.mini_batch_size=4]}}
  - {{name: final, kind: train, model: cold_start, overrides: [trainer.total_steps=1]}}
"""


def test_a_pipelines_sft_output_reaches_the_next_stages_actors(nodes):
    """configs/r1_pipeline.yaml cut short (tiny model, no evaluations): the SFT stage's checkpoint,
    written on the head, is the GRPO stage's model: its engine (rollout node) and learner (learner
    node) each fetch it once. (The SFT stage's learner gets the base, a folder of the head's cache,
    streamed too.)"""
    root = "/tmp/runs/pipeline"
    out = f"{root}/out"
    spec = nodes.view("head", f"{root}/pipeline.yaml")
    spec.parent.mkdir(parents=True)
    spec.write_text(PIPELINE.format(deadlines=", ".join(DEADLINES), out=out))
    before = {node: cached_models(nodes, node) for node in ("rollout", "learner")}
    logs = run_job(nodes, "pipeline-sft-then-grpo", f"{BIN / 'rlsys'} pipeline {root}/pipeline.yaml", timeout=600)
    done = {s: json.loads(nodes.view("head", f"{out}/{s}/done.json").read_text())
            for s in ("traces", "cold_start", "final")}
    sft_model = done["cold_start"]["model"]
    assert done["final"]["model"].startswith(f"{out}/final/run/checkpoints/step_1"), done["final"]
    assert nodes.view("head", done["final"]["model"]).joinpath("config.json").is_file()
    digest = listing_digest(model_files(nodes.view("head", sft_model)))
    for node in ("rollout", "learner"):  # the SFT output, in each node's cache
        assert digest in [p.name for p in cached_models(nodes, node) if p not in before[node]], node
    assert logs.count(f"{sft_model} (on the driver's node): fetching") == 2, logs[-4000:]  # once per node
    assert "not evaluated" in nodes.view("head", f"{out}/summary.md").read_text()
