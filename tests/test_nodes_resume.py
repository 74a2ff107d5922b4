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

The same with trainer.output_dir a storage URI (file:// on a folder the head and both learner
nodes mount at /tmp/storage, nothing else shared): every rank uploads its own part there and, on
node B, fetches its own part from there; the driver holds only its own files.

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
STORAGE = "/tmp/storage"  # where the head and both learner nodes mount the host's `storage` folder


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("storage")


@pytest.fixture(scope="module")
def nodes(tmp_path_factory, storage):
    nodes = LocalNodes(tmp_path_factory.mktemp("nodes"), isolated=True)
    shared = {storage: STORAGE}
    try:
        nodes.head(shared=shared)
        nodes.worker("a", 2, {"learner_a": 1}, cores=[0], shared=shared)
        nodes.worker("b", 2, {"learner_b": 1}, cores=[1], shared=shared)
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


def write_data(nodes: LocalNodes) -> None:
    nodes.view("head", DATA).write_text("".join(
        json.dumps({"prompt": f"What is {i} + 2?", "response": f"<think> {i} + 2 </think> <answer> {i + 2} </answer>"})
        + "\n" for i in range(8)))  # 8 examples, 4 a step: 2 steps an epoch, 4 in all


def test_a_resume_on_other_learner_nodes_continues_exactly(nodes):
    write_data(nodes)
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


def staged_files(nodes: LocalNodes, out: str) -> list[str]:
    """The files of the driver's staging folder on the head (the run folder it prints)."""
    staging = nodes.view("head", re.search(r"run folder (\S+) \(staged here", out).group(1))
    return sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())


def test_a_uri_run_writes_and_resumes_rank_by_rank_from_the_storage(nodes, storage):
    write_data(nodes)
    out = sft_on_head(nodes, f"file://{STORAGE}/whole", "learner_a")
    assert "every learner rank uploads its own checkpoint part there" in out, out[-3000:]
    for step in (2, 4):
        assert re.search(rf"step_{step}: learner ranks \[0, 1\] uploaded their parts .* to file://{STORAGE}/whole "
                         rf"themselves", out), out[-3000:]
    whole = storage / "whole"
    assert (whole / "checkpoints" / "latest").read_text().strip() == "step_4"
    assert sorted(p.name for p in (whole / "checkpoints").glob("step_*")) == ["step_2", "step_4"]
    from rlsys.checkpoint import damage, read_checksums

    for step in (2, 4):  # every rank's file listed, and each matches its checksum
        assert damage(whole / "checkpoints" / f"step_{step}") == []
    assert any("zero_pp_rank_1_" in name for name in read_checksums(whole / "checkpoints" / "step_2"))
    # The driver never held a rank's part: its staging folder has its own files only.
    driver = staged_files(nodes, out)
    assert not [f for f in driver if "/learner/" in f or f.endswith(".safetensors")], driver
    assert "checkpoints/step_4/trainer_state.json" in driver and "checkpoints/step_4/checksums.json" in driver

    # The same run killed after its step-2 save, on the storage: resumed on node B's ranks, which
    # never saw it, straight from the storage.
    cut = storage / "cut"
    shutil.copytree(whole, cut, ignore=shutil.ignore_patterns("step_4"))
    (cut / "checkpoints" / "latest").write_text("step_2\n")
    out = sft_on_head(nodes, f"file://{STORAGE}/cut", "learner_b", "trainer.resume=auto")
    assert "resuming from" in out and "step_2" in out, out[-3000:]
    assert re.search(rf"learner ranks \[0, 1\] fetched the state files they read from file://{STORAGE}/cut/checkpoints/"
                     rf"step_2 themselves .*sha256 checked", out), out[-3000:]
    assert "state files it reads sent to its node" not in out, "nothing streamed from the driver"
    driver = staged_files(nodes, out)
    assert not [f for f in driver if "/learner/" in f or f.endswith(".safetensors")], driver
    for node in ("a", "b"):  # the ranks' local copies (saves and the fetched state) are gone
        left = [p.name for p in nodes.view(node, "/tmp").iterdir() if p.name.startswith(("rlsys-ckpt-", "rlsys-resume-"))]
        assert not left, (node, left)

    resumed, expected = weights(cut / "checkpoints" / "step_4"), weights(whole / "checkpoints" / "step_4")
    assert resumed.keys() == expected.keys()
    assert all((resumed[k] == expected[k]).all() for k in expected), \
        [k for k in expected if not (resumed[k] == expected[k]).all()]
    assert damage(cut / "checkpoints" / "step_4") == []
    nll = {name: [json.loads(line)["nll"] for line in (root / "metrics.jsonl").read_text().splitlines()]
           for name, root in (("whole", whole), ("cut", cut))}
    assert nll["cut"] == nll["whole"] and len(nll["whole"]) == 4
