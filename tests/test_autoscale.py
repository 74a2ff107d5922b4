"""The elastic rollout pool under Ray's autoscaler, on this machine: the head runs the autoscaler
with Ray's fake multi-node provider (worker nodes are raylets started here on demand), with a
`rollout` node type (2 CPUs, up to 3 nodes, none to start with) and a `learner` node type.

What it proves, in one run: the first generator waits for a rollout node that the autoscaler adds;
generation dominates the step, so the pool asks for a second engine, the autoscaler adds a node,
and the engine joins with the learner's current weights; a spot-preemption notice (the node marked
draining) makes the pool give that engine back; the policy grows the pool again on a fresh node.
Every step's rollouts carry the weight version the loop expects, every prompt is generated once.
After the run, rlsys's request to the autoscaler is withdrawn and the rollout nodes are released.

Run alone with `pytest -m multinode`.
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest

from rlsys.cluster.local import BIN, Background, LocalNodes
from rlsys.observe.metrics import read_jsonl

pytestmark = pytest.mark.multinode
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def autoscaling(tmp_path):
    nodes = LocalNodes(tmp_path / "nodes")
    try:
        # 3 rollout nodes at most: 2 engines, and a third node while the drained one is still going
        nodes.head(autoscaling={"rollout": {"resources": {"CPU": 2, "rollout": 1}, "min_workers": 0, "max_workers": 3},
                                "learner": {"resources": {"CPU": 4, "learner": 1}, "min_workers": 1,
                                            "max_workers": 1}})
        yield nodes
    finally:
        nodes.stop()


def rollout_nodes(nodes: LocalNodes) -> list[str]:
    return [n for n, res in nodes.alive().items() if "rollout" in res]


def test_pool_grows_with_the_autoscaler_gives_back_a_draining_node_and_grows_again(autoscaling, tmp_path):
    run_dir = tmp_path / "run"
    # Bound by events, not a step count (an engine joins 15-30 s after it is asked for, slower on a
    # loaded machine): the run, with total_steps far beyond what it needs, is stopped with SIGTERM
    # once the pool has grown, given back the drained node and grown again, plus two steps.
    drained_node = None

    def pool_events() -> list[dict]:
        pool = run_dir / "pool.jsonl"
        return [e for p in read_jsonl(pool) for e in p["events"]] if pool.is_file() else []

    with Background(
            [str(BIN / "rlsys"), "train", "configs/tiny.yaml", "trainer.progress=false", "trainer.total_steps=1000",
             f"trainer.output_dir={run_dir}", f"cluster.address={autoscaling.address}",
             "cluster.placement=disaggregated", "cluster.shared_storage=true", "generator.num_cpus=2",
             "generator.num_engines=1", "data.prompts_per_step=4", "learner.mini_batch_size=16",
             "autoscale.enabled=true", "autoscale.min_generators=1", "autoscale.max_generators=2",
             "autoscale.patience=1", "autoscale.grow_above=0.2"],
            tmp_path / "driver.log", REPO) as run:
        deadline, stop_after = time.time() + 900, None
        while run.proc.poll() is None and time.time() < deadline:
            pool = read_jsonl(run_dir / "pool.jsonl") if (run_dir / "pool.jsonl").is_file() else []
            if drained_node is None and pool and len(pool[-1]["engines"]) == 2:
                # the second engine joined: its node gets a spot-preemption notice
                newest = max(pool[-1]["engines"], key=int)
                drained_node = pool[-1]["engines"][newest]
                autoscaling.drain(drained_node)
            kinds = [e["event"] for e in pool_events() if e["event"] in ("join", "drained")]
            if stop_after is None and kinds[:3] == ["join", "drained", "join"]:
                stop_after = len(pool) + 2
            if stop_after is not None and len(pool) >= stop_after:
                run.proc.send_signal(signal.SIGTERM)  # the step in progress finishes, is checkpointed, exit 0
                break
            time.sleep(1)
        code = run.wait(timeout=300)
    out = run.output()
    assert code == 0, out[-6000:]
    assert drained_node is not None, "the pool never grew to 2 engines:\n" + out[-4000:]
    assert stop_after is not None, "the pool did not grow, give back the drained node and grow again in 900 s:\n" \
        + out[-4000:]
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    steps = len(metrics)
    assert [(m["rollout/weight_version"], m["weight_version"]) for m in metrics] == [(s, s + 1) for s in range(steps)]
    assert [m["rollouts/count"] for m in metrics] == [4 * 8] * steps
    sizes = [m["pool/size"] for m in metrics]
    changes = [b for a, b in zip(sizes, sizes[1:]) if a != b]
    assert changes[:3] == [2, 1, 2], f"pool sizes per step: {sizes}"
    events = pool_events()
    kinds = [e["event"] for e in events]
    # (the pool may change again later in the run: the policy is free to, what matters is this order)
    assert [k for k in kinds if k in ("join", "drained")][:3] == ["join", "drained", "join"], events
    assert kinds.count("drained") == 1, events
    joins = [e for e in events if e["event"] == "join"]
    assert all(e["seconds_to_serving"] > 0 for e in joins)
    assert [m["pool/join_seconds"] > 0 for m in metrics].count(True) == len(joins)
    [drain] = [e for e in events if e["event"] == "drained"]
    assert drain["node"] == drained_node
    assert joins[1]["node"] != drained_node  # the regrown engine is on a fresh node
    # the first engine's placement group waited for the autoscaler's first rollout node, and said so
    assert re.search(r"waiting for the autoscaler .*rlsys-generator-0 needs 1 x .*'rollout'.*missing now: no alive "
                     r"node declares rollout", out), out[-4000:]
    # every engine was on a rollout node; the run's request withdrawn, the autoscaler lets them go
    placement = json.loads((run_dir / "placement.json").read_text())
    assert all("rollout" in a["node_resources"] for a in placement if a["role"] == "generator"), placement
    deadline = time.time() + 180
    while rollout_nodes(autoscaling):
        assert time.time() < deadline, f"rollout nodes still up after the run: {rollout_nodes(autoscaling)}"
        time.sleep(3)
