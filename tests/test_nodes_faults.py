"""Faults on nodes that share nothing (rlsys/cluster/isolation.py), caused from outside while a
submitted job runs, as a cloud or a network causes them: the run folder's disk fills up during a
save, every link drops and delays packets for a whole run, the learner node is lost, a rollout
node's link is cut mid-push, a rollout node is lost during an asynchronous step.

One cluster for the module: a head (the job's driver; its run folder on a small disk of its own),
two rollout nodes with room for one engine each, a learner node; a new learner node and a third
rollout node arrive where a test says so (the tests run in file order, each on the cluster the one
before left). Ray's health checks are tightened (a node is declared dead after about 10-20 s of
silence instead of 30-60) so that a partition costs the test less time.

Run alone with `pytest -m multinode tests/test_nodes_faults.py`; skipped where namespaces are not allowed.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from rlsys.checkpoint import verify
from rlsys.cluster.isolation import available
from rlsys.cluster.local import BIN, LocalNodes, clean_env
from rlsys.observe.metrics import read_jsonl

pytestmark = [pytest.mark.multinode, pytest.mark.skipif(available() is not None, reason=str(available()))]
REPO = Path(__file__).resolve().parent.parent
DISK_MB = 24  # the run folder's disk: a few tiny checkpoints
HEALTH = {"RAY_health_check_period_ms": "2000", "RAY_health_check_timeout_ms": "4000",
          "RAY_health_check_failure_threshold": "4"}
RUN = ["configs/tiny.yaml", "trainer.progress=false", "generator.num_cpus=2", "cluster.placement=disaggregated",
       "reward.num_workers=1", *[f"deadlines.{phase}_s=240" for phase in ("start", "generate", "score", "train", "save")],
       "deadlines.sync_s=120"]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    disk = tmp_path_factory.mktemp("run-disk")
    # The run folder's disk: a size-limited tmpfs on the host, bound into the head as /tmp/runs before it
    # starts (what a node's own small disk is; the test fills and frees it from the host).
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "rlsys-test-disk", str(disk)], check=True)
    nodes = LocalNodes(tmp_path_factory.mktemp("nodes"), isolated=True, env=HEALTH)
    try:
        nodes.head(shared={str(disk): "/tmp/runs"})
        nodes.worker("rollout-a", 2, {"rollout": 1}, cores=[0])  # room for one 2-CPU engine each
        nodes.worker("rollout-b", 2, {"rollout": 1}, cores=[0])
        nodes.worker("learner", 4, {"learner": 1}, cores=[1])  # 2 learner ranks and the reward worker
        nodes.disk = disk
        yield nodes
    finally:
        nodes.stop()
        subprocess.run(["umount", str(disk)], check=False)


def host(nodes: LocalNodes, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """A command on the host's side of the cluster network."""
    return subprocess.run(nodes.host_command([str(BIN / "rlsys"), *args]), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=clean_env())


def submit(nodes: LocalNodes, *overrides: str) -> str:
    done = host(nodes, "submit", *RUN, *overrides, "--address", nodes.dashboard)
    assert done.returncode == 0, done.stdout + done.stderr
    return re.search(r"submitted job (\S+)", done.stdout).group(1)


def state(nodes: LocalNodes, job: str) -> str:
    status = host(nodes, "jobs", "status", job, "--address", nodes.dashboard)
    assert status.returncode == 0, status.stderr
    return status.stdout.split()[0]


def wait_until(what: str, check, timeout: float, nodes: LocalNodes | None = None, job: str | None = None) -> None:
    deadline = time.time() + timeout
    while not check():
        if job is not None and state(nodes, job) not in ("PENDING", "RUNNING"):
            raise AssertionError(f"job {job} ended before {what}:\n{logs(nodes, job)[-5000:]}")
        if time.time() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f}s" + (f"\n{logs(nodes, job)[-5000:]}" if job else ""))
        time.sleep(2)


def finish(nodes: LocalNodes, job: str, timeout: float = 600) -> str:
    wait_until(f"job {job} ends", lambda: state(nodes, job) not in ("PENDING", "RUNNING"), timeout)
    return state(nodes, job)


def logs(nodes: LocalNodes, job: str) -> str:
    return host(nodes, "jobs", "logs", job, "--address", nodes.dashboard).stdout


def steps_logged(run: Path) -> list[int]:
    return [m["step"] for m in read_jsonl(run / "metrics.jsonl")] if (run / "metrics.jsonl").is_file() else []


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_the_run_resumes_from_it(nodes):
    """The run folder's disk fills up (another process writes to it) after the first checkpoint:
    the next save fails, its partial folder is removed, `latest` still names the whole previous
    checkpoint, and the run stops with a message naming the node and that checkpoint. With space
    freed, trainer.resume=auto continues from it to the end."""
    run_dir = "/tmp/runs/disk"
    run, filler = Path(nodes.disk) / "disk", Path(nodes.disk) / "filler"
    job = submit(nodes, "trainer.total_steps=6", "trainer.save_every=1", f"trainer.output_dir={run_dir}")
    first = run / "checkpoints" / "step_1"
    wait_until("the first checkpoint", lambda: (first / "checksums.json").is_file(), 400, nodes, job)
    size = sum(f.stat().st_size for f in first.rglob("*") if f.is_file())
    free = int(subprocess.run(["df", "--output=avail", "-B1", str(nodes.disk)], capture_output=True, text=True,
                              check=True).stdout.split()[-1])
    assert free > size, f"the disk must hold the first checkpoint ({size} B) and more ({free} B free)"
    # Leave less than half a checkpoint: the next save runs out of space part-way.
    subprocess.run(["fallocate", "-l", str(free - size // 2), str(filler)], check=True)
    assert finish(nodes, job) == "FAILED"
    out = logs(nodes, job)
    assert re.search(r"on node head \(10\.213\.\d+\.\d+\) failed: .*No space left on device", out), out[-4000:]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert f"Last checkpoint: {run_dir}/checkpoints/{latest}" in out, out[-4000:]
    assert not list((run / "checkpoints").glob("*.partial")), "the failed save left its partial folder"
    verify(run / "checkpoints" / latest)  # every file whole, as its checksums say
    stopped_at = int(latest.removeprefix("step_"))
    filler.unlink()
    job = submit(nodes, "trainer.total_steps=6", "trainer.save_every=1", f"trainer.output_dir={run_dir}",
                 "trainer.resume=auto", "trainer.keep_last=2")
    assert finish(nodes, job) == "SUCCEEDED", logs(nodes, job)[-5000:]
    assert f"resuming from {run_dir}/checkpoints/step_{stopped_at}" in logs(nodes, job)
    assert steps_logged(run) == list(range(6))
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_6"


def test_a_run_with_5_percent_packet_loss_and_50_ms_delay_on_every_link_finishes(nodes):
    """5% of packets dropped in and out of every node (nftables) and everything each node sends held
    50 ms (a relay process per node: this kernel has no tc netem), so a round trip between two nodes
    takes 100 ms, for a whole short run: TCP resends, the run finishes with every rollout; its
    timings say where the time went."""
    names = ["head", "rollout-a", "rollout-b", "learner"]
    for name in names:
        nodes.shape(name, loss_pct=5)
        nodes.delay(name, 50)
    try:
        run_dir = "/tmp/runs/lossy"
        job = submit(nodes, "trainer.total_steps=3", f"trainer.output_dir={run_dir}")
        assert finish(nodes, job) == "SUCCEEDED", logs(nodes, job)[-5000:]
    finally:
        for name in names:
            nodes.shape(name)
            nodes.delay(name, 0)
    metrics = read_jsonl(Path(nodes.disk) / "lossy" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert all(m["rollouts/count"] == 64 for m in metrics)
    print("timings with 5% loss and 50 ms delay:",
          [{k: round(v, 2) for k, v in m.items() if k.startswith("timing/")} for m in metrics])


def same_run(metrics: dict) -> dict:
    """What two runs of the same config must agree on exactly: all but timings (and what follows from them)."""
    return {k: v for k, v in metrics.items() if not k.startswith(("timing/", "throughput/", "pool/join"))}


def test_a_learner_node_lost_stops_the_run_naming_its_checkpoint_and_resume_on_a_new_node_matches_an_uninterrupted_run(nodes):
    """The learner node goes at once (both ranks and the reward worker with it) right after a
    checkpoint: the run stops naming that checkpoint. A new learner node arrives (its disk has never
    seen the run); `trainer.resume=auto` finishes the run there, and every step matches an
    uninterrupted run of the same config on this cluster bit for bit (fp32: same prompts, same
    samples from new engines, same rewards, losses and gradient norms)."""
    rows = (REPO / "configs" / "data" / "toy_digits.jsonl").read_text().splitlines()[:16]
    # 16 rows and 8 prompts a step: every checkpoint (every 2 steps) falls on an epoch boundary.
    nodes.view("head", "/tmp/rows16.jsonl").write_text("\n".join(rows) + "\n")
    steps = 6
    common = ["data.path=/tmp/rows16.jsonl", f"trainer.total_steps={steps}", "trainer.save_every=2",
              "trainer.seed=7"]
    job = submit(nodes, *common, "trainer.output_dir=/tmp/runs/whole")
    assert finish(nodes, job) == "SUCCEEDED", logs(nodes, job)[-5000:]
    run_dir = "/tmp/runs/learner-lost"
    run = Path(nodes.disk) / "learner-lost"
    job = submit(nodes, *common, f"trainer.output_dir={run_dir}")
    deadline = time.time() + 400
    while not (run / "checkpoints" / "latest").is_file():  # polled closely: a step takes 2-3 s
        assert state(nodes, job) in ("PENDING", "RUNNING") and time.time() < deadline, logs(nodes, job)[-5000:]
        time.sleep(0.2)
    lost_ip = nodes.iso.boxes["learner"].ip
    nodes.kill("learner")
    # The ranks' new home (the checkpoint is only on the head); it arrives before anything below can
    # fail, so that the tests after this one have a learner node whatever happens here.
    nodes.worker("learner-2", 4, {"learner": 1}, cores=[1])
    assert finish(nodes, job) == "FAILED", f"the run ended before the node went: {logs(nodes, job)[-3000:]}"
    out = logs(nodes, job)
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert int(latest.removeprefix("step_")) < steps, latest
    # Whichever of the node's actors the run found dead first (a learner rank, or the reward worker
    # whose replacement Ray placed on the node before declaring it dead), the stop names the node.
    ip = re.escape(lost_ip)
    assert re.search(rf"(learner|reward worker) \d died during .*(its node {ip} is gone|it ran on node {ip})", out), \
        out[-4000:]
    assert f"The run stops. Last checkpoint: {run_dir}/checkpoints/{latest}; continue with trainer.resume=auto" \
        in out, out[-4000:]
    job = submit(nodes, *common, f"trainer.output_dir={run_dir}", "trainer.resume=auto")
    assert finish(nodes, job) == "SUCCEEDED", logs(nodes, job)[-5000:]
    assert f"resuming from {run_dir}/checkpoints/{latest}" in logs(nodes, job)
    expected, got = read_jsonl(Path(nodes.disk) / "whole" / "metrics.jsonl"), read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in got] == list(range(steps))
    for a, b in zip(expected, got):
        assert same_run(b) == same_run(a), f"step {a['step']}"
    assert read_jsonl(run / "samples.jsonl") == read_jsonl(Path(nodes.disk) / "whole" / "samples.jsonl")
    placed = {a["ip"] for a in json.loads((run / "placement.json").read_text()) if a["role"] == "learner"}
    assert placed == {nodes.iso.boxes["learner-2"].ip}, placed


def wait_for_arriving(nodes: LocalNodes, name: str, least: int, timeout: float) -> None:
    """Until over `least` bytes reached the node over its link within half a second."""
    deadline, seen = time.time() + timeout, []
    while True:
        now, (received, _) = time.time(), nodes.iso.link_bytes(name)
        seen = [(t, b) for t, b in seen if now - t <= 0.5] + [(now, received)]
        if received - seen[0][1] > least:
            return
        assert now < deadline, f"no {least} B into {name} within {timeout:.0f}s"
        time.sleep(0.05)


def test_a_rollout_node_cut_off_mid_push_loses_its_engine_and_a_replacement_joins_on_a_new_node(nodes):
    """rollout-b's link is cut (silent both ways) while a weight push is arriving there (its link
    slowed to 1 Mb/s so that the push lasts ~3 s; the test watches the bytes arrive): the push's
    receive there fails when Ray declares the node dead, the learners' sends give up at the group
    timeout (deadlines.sync_s: a silent link never resets), every member's group is closed and the
    push goes again to the engine left. Every step still has every rollout, and a replacement engine
    starts on the node with room that arrives (rollout-c) and joins with the current weights."""
    run_dir = "/tmp/runs/cut"
    run = Path(nodes.disk) / "cut"
    # With one engine a step takes 1-1.5 s; the new node's start and the replacement's (20 + 30-40 s)
    # took 35 steps once: 60 leave room.
    steps = 60
    job = submit(nodes, f"trainer.total_steps={steps}", f"trainer.output_dir={run_dir}", "trainer.save_every=0",
                 "deadlines.sync_s=30")
    wait_until("step 1", lambda: len(steps_logged(run)) >= 1, 400, nodes, job)
    ip = {name: box.ip for name, box in nodes.iso.boxes.items()}
    engines = {a["rank"]: a["ip"] for a in json.loads((run / "placement.json").read_text()) if a["role"] == "generator"}
    assert sorted(engines.values()) == sorted([ip["rollout-a"], ip["rollout-b"]]), engines
    [victim] = [rank for rank, addr in engines.items() if addr == ip["rollout-b"]]
    nodes.shape("rollout-b", rate_mbit=1)
    # A weight push arriving: a push of the tiny model is ~0.4 MB, ~3 s at 1 Mb/s; generation sends
    # a node a few KB a step. 40 KB in 0.5 s is two thirds of the link's rate.
    wait_for_arriving(nodes, "rollout-b", least=40_000, timeout=120)
    nodes.cut("rollout-b")
    nodes.worker("rollout-c", 2, {"rollout": 1}, cores=[0])  # a node with room arrives
    assert finish(nodes, job, timeout=900) == "SUCCEEDED", logs(nodes, job)[-5000:]
    nodes.kill("rollout-b")  # Ray declared it dead: it cannot come back as the same node
    text = logs(nodes, job)
    assert re.search(rf"weight push \d+: generator\(s\) \[{victim}\] died during it; pushing again to the 1 left",
                     text), text[-5000:]
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(steps))
    assert [m["rollouts/count"] for m in metrics] == [64] * steps  # 8 prompts x 8 samples, none lost or doubled
    assert [(m["rollout/weight_version"], m["weight_version"]) for m in metrics] == [(s, s + 1) for s in range(steps)]
    events = [e for p in read_jsonl(run / "pool.jsonl") for e in p["events"]]
    [lost] = [e for e in events if e["event"] == "lost"]
    assert lost["engine"] == victim and lost["found"] == "during the weight push", events
    joins = [e for e in events if e["event"] == "join"]
    assert len(joins) == 1 and joins[0]["step"] > lost["step"], f"no replacement joined: {events}"
    placed = {a["rank"]: a["ip"] for a in json.loads((run / "placement.json").read_text()) if a["role"] == "generator"}
    assert placed[joins[0]["engine"]] == nodes.iso.boxes["rollout-c"].ip and victim not in placed, placed
    seconds = [m["timing/sync"] for m in metrics if "timing/sync" in m]
    print(f"lost during the push of step {lost['step']}; replacement joined at step {joins[0]['step']} after "
          f"{joins[0]['seconds_to_serving']:.0f}s; the longest push took {max(seconds, default=0):.0f}s")


def test_a_rollout_node_lost_during_an_asynchronous_step_leaves_the_run_going_on_the_others(nodes):
    """trainer.max_staleness=1 (generation overlaps learning): a rollout node goes at once (every
    process of it killed) while the producer samples and the learner pushes. Its engine leaves the
    pool (the asynchronous pool is not refilled), its chunk goes to the other engine, and every step
    still trains on every rollout within the staleness bound."""
    run_dir = "/tmp/runs/async"
    run = Path(nodes.disk) / "async"
    # Steps take 2-3 s here: with 8 steps and the kill after step 2, CI once killed the node after the
    # producer's last chunk and no engine was lost. 16 steps and the kill after the first one leave
    # room; the step logged when the node went is checked below.
    steps = 16
    job = submit(nodes, f"trainer.total_steps={steps}", f"trainer.output_dir={run_dir}", "trainer.save_every=0",
                 "trainer.max_staleness=1")
    wait_until("step 1", lambda: len(steps_logged(run)) >= 1, 400, nodes, job)
    ip = {name: box.ip for name, box in nodes.iso.boxes.items()}
    engines = {a["rank"]: a["ip"] for a in json.loads((run / "placement.json").read_text()) if a["role"] == "generator"}
    assert len(engines) == 2, engines
    victim, address = max(engines.items())
    [node] = [name for name, addr in ip.items() if addr == address]
    nodes.kill(node)
    killed_after = len(steps_logged(run))
    assert killed_after < steps - 2, f"the node went after step {killed_after - 1}: too late to test anything"
    assert finish(nodes, job, timeout=900) == "SUCCEEDED", logs(nodes, job)[-5000:]
    text = logs(nodes, job)
    assert f"generator {victim} lost" in text, text[-5000:]
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(steps))
    assert [m["rollouts/count"] for m in metrics] == [64] * steps
    assert all(m["staleness/0"] + m["staleness/1"] == pytest.approx(1.0) for m in metrics)
    assert metrics[-1]["pool/size"] == 1
