"""Roles on the nodes config asks for, on a real 4-node Ray cluster on this machine: a head with no
CPUs, two rollout nodes (2 CPUs, custom resource `rollout`) and a learner node (4 CPUs, `learner`),
each a node that shares nothing with the others (LocalNodes(isolated=True), rlsys/cluster/local.py):
its own address, /tmp, home and cache. Drivers run on the head (`rlsys train` there), jobs are
submitted from the host's side of the cluster network; run folders are on the head's own disk
(read through nodes.view), no storage is shared: checkpoints come to the driver.

What it proves: a job submitted with `rlsys submit` and followed with `rlsys jobs` runs with
generators only on rollout nodes and learners only on the learner node (disaggregated); colocated
puts generator i on learner rank i's node; a placement no node can satisfy stops within
cluster.placement_timeout_s naming the missing resource; a generator whose node Ray marks as
draining (a spot-preemption notice) leaves at the next step boundary, the run goes on with every
prompt generated once per step by the current weights, and the node, once idle, goes.

Run alone with `pytest -m multinode`; skipped where namespaces are not allowed (isolation.available()).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from rlsys.cluster.isolation import available
from rlsys.cluster.local import BIN, Background, LocalNodes, clean_env
from rlsys.observe.metrics import read_jsonl

pytestmark = [pytest.mark.multinode, pytest.mark.skipif(available() is not None, reason=str(available()))]
REPO = Path(__file__).resolve().parent.parent
TINY = ["configs/tiny.yaml", "trainer.progress=false", "generator.num_cpus=2"]  # 2 CPUs: one engine a rollout node


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    nodes = LocalNodes(tmp_path_factory.mktemp("nodes"), isolated=True)
    try:
        nodes.head()
        nodes.worker("rollout-a", 2, {"rollout": 1})
        nodes.worker("rollout-b", 2, {"rollout": 1})
        nodes.worker("learner", 4, {"learner": 1})
        yield nodes
    finally:
        nodes.stop()


def on_host(nodes: LocalNodes, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """args on the host's side of the cluster network (rlsys submit, rlsys jobs)."""
    return subprocess.run(nodes.host_command(args), cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=clean_env())


def on_head(nodes: LocalNodes, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """args on the head node: a driver (rlsys train with cluster.address), as on a real cluster."""
    argv, pin = nodes.command("head", args, cwd=REPO)
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=nodes.node_env(),
                          preexec_fn=pin)


def head_run_dir(nodes: LocalNodes, tmp_path: Path) -> tuple[str, Path]:
    """A run folder on the head's own disk: (its path there, where the host reads it)."""
    there = f"/tmp/runs/{tmp_path.name}"
    return there, nodes.view("head", there)


def tails(p: subprocess.CompletedProcess) -> str:
    return f"exit {p.returncode}\n--- stdout ---\n{p.stdout[-3000:]}\n--- stderr ---\n{p.stderr[-3000:]}"


def roles_by_node(run_dir: Path, nodes: LocalNodes) -> dict[str, set[str]]:
    names = {node_id: name for name, node_id in nodes.node_ids.items()}
    out: dict[str, set[str]] = {}
    for actor in json.loads((run_dir / "placement.json").read_text()):
        out.setdefault(actor["role"], set()).add(names.get(actor["node_id"], "head"))
    return out


def test_submitted_disaggregated_job_puts_each_role_on_its_pool(pools, tmp_path):
    there, run_dir = head_run_dir(pools, tmp_path)  # the job's driver runs on the head
    submitted = on_host(pools, [str(BIN / "rlsys"), "submit", *TINY, "--address", pools.dashboard,
                                "trainer.total_steps=2", f"trainer.output_dir={there}",
                                "cluster.placement=disaggregated", "profile.enabled=true"])
    assert submitted.returncode == 0, tails(submitted)
    job = re.search(r"submitted job (\S+)", submitted.stdout).group(1)
    deadline, state = time.time() + 600, ""
    while time.time() < deadline:
        status = on_host(pools, [str(BIN / "rlsys"), "jobs", "status", job, "--address", pools.dashboard], timeout=60)
        assert status.returncode == 0, tails(status)
        state = status.stdout.split()[0]
        assert state in ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED"), status.stdout
        if state not in ("PENDING", "RUNNING"):
            break
        time.sleep(3)
    logs = on_host(pools, [str(BIN / "rlsys"), "jobs", "logs", job, "--address", pools.dashboard], timeout=60)
    assert state == "SUCCEEDED", f"{state}\n{logs.stdout[-4000:]}"
    assert f"run folder: {there}" in logs.stdout and "placement disaggregated" in logs.stdout
    assert roles_by_node(run_dir, pools) == {"generator": {"rollout-a", "rollout-b"}, "learner": {"learner"},
                                             "reward": {"learner"}}  # rewards: where CPUs are left
    for actor in json.loads((run_dir / "placement.json").read_text()):
        assert {"node_id", "ip", "resources", "node_resources", "role", "rank"} <= set(actor), actor
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [0, 1]
    assert (run_dir / "checkpoints" / "step_2" / "config.json").is_file()
    # engines on other nodes than the learners': the weights went over the collective
    calls = {e["name"] for e in json.loads((run_dir / "timeline.json").read_text())["traceEvents"]}
    assert "broadcast_weights" in calls and "share_weights" not in calls, sorted(calls)


def test_colocated_puts_each_generator_beside_its_learner_rank(pools, tmp_path):
    there, run_dir = head_run_dir(pools, tmp_path)
    proc = on_head(pools, [str(BIN / "rlsys"), "train", "configs/tiny.yaml", "trainer.progress=false",
                           "trainer.total_steps=1", f"trainer.output_dir={there}", f"cluster.address={pools.address}",
                           "cluster.placement=colocated", "profile.enabled=true"])
    assert proc.returncode == 0, tails(proc)
    placement = json.loads((run_dir / "placement.json").read_text())
    node = {(a["role"], a["rank"]): a["node_id"] for a in placement}
    assert {r for r, _ in node} == {"learner", "generator", "reward"}
    for rank in (0, 1):
        assert node[("generator", rank)] == node[("learner", rank)], placement
    # Both learner ranks on one node here: their engines got the weights by handle (shared memory
    # mapped across the node's processes), not over the collective.
    assert node[("learner", 0)] == node[("learner", 1)], placement
    calls = {e["name"] for e in json.loads((run_dir / "timeline.json").read_text())["traceEvents"]}
    assert "share_weights" in calls and "broadcast_weights" not in calls, sorted(calls)


def test_impossible_placement_fails_fast_naming_what_is_missing(pools, tmp_path):
    start = time.time()
    there, _ = head_run_dir(pools, tmp_path)
    proc = on_head(pools, [str(BIN / "rlsys"), "train", *TINY, "trainer.total_steps=1", f"trainer.output_dir={there}",
                           f"cluster.address={pools.address}", "cluster.placement=disaggregated",
                           "cluster.rollout_resource=tpu_pool", "cluster.placement_timeout_s=5"], timeout=300)
    assert proc.returncode != 0
    assert "no alive node declares tpu_pool" in proc.stderr and "within 5s" in proc.stderr, tails(proc)
    assert time.time() - start < 120, "it should stop after the timeout, not run on"


def test_a_draining_node_gives_back_its_generator_and_the_run_goes_on(pools, tmp_path):
    there, run_dir = head_run_dir(pools, tmp_path)
    steps = 8
    argv, pin = pools.command("head", [str(BIN / "rlsys"), "train", *TINY, f"trainer.total_steps={steps}",
                                       f"trainer.output_dir={there}", f"cluster.address={pools.address}",
                                       "cluster.placement=disaggregated"], cwd=REPO)
    with Background(argv, tmp_path / "driver.log", REPO, preexec_fn=pin, env=pools.node_env()) as run:
        run.wait_until("2 steps", lambda: (run_dir / "metrics.jsonl").is_file()
                       and len(read_jsonl(run_dir / "metrics.jsonl")) >= 2, timeout=400)
        placement = json.loads((run_dir / "placement.json").read_text())
        victim = next(a for a in placement if a["role"] == "generator" and a["rank"] == 1)
        pools.drain(victim["node_id"])
        code = run.wait(timeout=600)
    out = run.output()
    assert code == 0, out[-5000:]
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(steps))
    # every prompt generated once per step (8 prompts x 8 samples), with the weights of that step
    assert [m["rollouts/count"] for m in metrics] == [64] * steps
    assert [(m["rollout/weight_version"], m["weight_version"]) for m in metrics] == [(s, s + 1) for s in range(steps)]
    pool = read_jsonl(run_dir / "pool.jsonl")
    events = [e for p in pool for e in p["events"]]
    [left] = [e for e in events if e["event"] == "drained"]
    assert left["engine"] == 1 and left["node"] == victim["node_id"]
    after = [p for p in pool if p["step"] >= left["step"]]
    assert after and all(list(p["engines"]) == ["0"] for p in after), after
    assert [m["pool/size"] for m in metrics if m["step"] >= left["step"]] == [1] * len(after)
    # the pool asks for a replacement (generator.num_engines = 2); no rollout node has room for it
    assert any(e["event"] == "request" and e["why"] == "replace" for e in events)
    assert victim["node_id"] not in {a["node_id"] for a in json.loads((run_dir / "placement.json").read_text())
                                     if a["role"] == "generator"}
    # with its generator gone the drained node is idle, and Ray lets it go
    deadline = time.time() + 120
    while victim["node_id"] in pools.alive():
        assert time.time() < deadline, "the drained node should leave once its generator is gone"
        time.sleep(2)
