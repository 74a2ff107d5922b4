"""A resume on nodes that share nothing, after the learner ranks moved to another node.

Three isolated nodes (rlsys/cluster/isolation.py): a head where the driver and the run folder
live, and two learner nodes A and B, each with its own disk, declaring different custom
resources. `rlsys sft` (the learner group alone: no generation, so the weights are a function of
the data and the seed) runs 4 steps with its 2 learner ranks (ZeRO-1: each rank has an
optimizer partition of its own) on node A, saving at steps 2 and 4: that is the uninterrupted
run. A copy of its run folder cut back to step 2 (as if killed after that save) is resumed with
`trainer.resume=auto` and `cluster.learner_resource` naming node B's resource: the ranks there
never saw the checkpoint, so they are streamed the state files they read (each file once per
node), and their saves are streamed back to the head. The resumed run's step-4 weights must equal the uninterrupted run's,
bit for bit (the same tolerance as tests/test_learner.py's single-process resume: none).

Run alone with `pytest -m multinode tests/test_nodes_resume.py`; skipped where namespaces are not allowed.
Measured on a 2-core machine shared with other work (load 15-20): 229-288 s, of which the nodes'
start 60-70 s and each `rlsys sft` 80-105 s (mostly the driver's and the ranks' imports).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from rlsys.cluster.isolation import available
from rlsys.cluster.local import BIN, LocalNodes, clean_env

pytestmark = [pytest.mark.multinode, pytest.mark.skipif(available() is not None, reason=str(available()))]
REPO = Path(__file__).resolve().parent.parent
DATA = "/tmp/sft.jsonl"  # on the head's own disk: the driver reads it


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    nodes = LocalNodes(tmp_path_factory.mktemp("nodes"), isolated=True)
    try:
        nodes.head()
        nodes.worker("a", 2, {"learner_a": 1}, cores=[0])
        nodes.worker("b", 2, {"learner_b": 1}, cores=[1])
        yield nodes
    finally:
        nodes.stop()


def sft_on_head(nodes: LocalNodes, run_dir: str, resource: str, *extra: str) -> str:
    """`rlsys sft` with its driver on the head (as a job's driver would run), the 2 learner ranks
    on the node that declares `resource`; returns its output."""
    argv, pin = nodes.command("head", [
        str(BIN / "rlsys"), "sft", str(REPO / "configs" / "tiny.yaml"), f"data.path={DATA}", "sft.epochs=2",
        "learner.num_ranks=2", "learner.zero_stage=1", "learner.mini_batch_size=4", "learner.micro_batch_size=2",
        "learner.lr=3e-3", "learner.num_cpus=1", "cluster.placement=disaggregated",
        f"cluster.learner_resource={resource}", f"cluster.address={nodes.address}", f"trainer.output_dir={run_dir}",
        "trainer.save_every=2", "trainer.progress=false", "deadlines.start_s=200", "deadlines.train_s=200",
        "deadlines.save_s=200", *extra])
    env = clean_env()
    env.pop("RLSYS_CACHE", None)  # the host's cache is no node's: the head builds the model in its own home
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=400, env=env, preexec_fn=pin)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_a_resume_on_other_learner_nodes_continues_exactly(nodes):
    nodes.view("head", DATA).write_text("".join(
        json.dumps({"prompt": f"What is {i} + 2?", "response": f"<think> {i} + 2 </think> <answer> {i + 2} </answer>"})
        + "\n" for i in range(8)))  # 8 examples, 4 a step: 2 steps an epoch, 4 in all
    out = sft_on_head(nodes, "/tmp/runs/whole", "learner_a")
    assert "learner rank(s) [0, 1] run on other nodes than the driver" in out, out[-3000:]
    whole = nodes.view("head", "/tmp/runs/whole")
    assert sorted(p.name for p in (whole / "checkpoints").glob("step_*")) == ["step_2", "step_4"]
    assert any((whole / "checkpoints" / "step_2" / "learner").rglob("zero_pp_rank_1_*")), "rank 1's partition"

    # The same run killed after its step-2 save: the checkpoint, `latest` naming it, the logs so far.
    cut = nodes.view("head", "/tmp/runs/cut")
    shutil.copytree(whole, cut, ignore=shutil.ignore_patterns("step_4"))
    (cut / "checkpoints" / "latest").write_text("step_2\n")
    out = sft_on_head(nodes, "/tmp/runs/cut", "learner_b", "trainer.resume=auto")
    assert "resuming from" in out and "step_2" in out, out[-3000:]
    # rank 0 is sent the module states and its partition, rank 1 (same node) its partition only
    sent = {int(r): (int(n), int(m)) for r, n, m in re.findall(r"learner (\d): (\d+) of the (\d+) state files", out)}
    assert sent.keys() == {0, 1} and sent[0][0] == sent[0][1] and sent[1][0] < sent[1][1], (sent, out[-3000:])
    for node in ("a", "b"):  # nothing of the run on the learner nodes' disks: it all went to the head
        assert not nodes.view(node, "/tmp/runs").exists()

    resumed, expected = weights(cut / "checkpoints" / "step_4"), weights(whole / "checkpoints" / "step_4")
    assert resumed.keys() == expected.keys()
    assert all((resumed[k] == expected[k]).all() for k in expected), \
        [k for k in expected if not (resumed[k] == expected[k]).all()]
    nll = {name: [json.loads(line)["nll"] for line in (root / "metrics.jsonl").read_text().splitlines()]
           for name, root in (("whole", whole), ("cut", cut))}
    assert nll["cut"] == nll["whole"] and len(nll["whole"]) == 4
