"""rlsys doctor's checks as pure functions, on clusters described by hand (what Ray's nodes() gives).
The whole command, on isolated nodes with a missing resource and a blocked link, is in
tests/test_nodes.py."""

from __future__ import annotations

from rlsys.cluster.doctor import device_problems, placement_problems, version_problems
from rlsys.config import load_config

VERSIONS = {"torch": "2.13.0", "vllm": "0.32.0", "deepspeed": "0.19.8", "ray": "2.60.0", "rlsys": "0.1.0"}


def node(host: str, **versions) -> dict:
    return {"node_id": host, "host": host, "ip": f"10.0.0.{len(host)}", "gpus": [], "versions": VERSIONS | versions}


def test_a_package_version_that_differs_between_nodes_is_a_problem():
    assert version_problems([node("a"), node("bb")]) == []
    [(what, fix)] = version_problems([node("a"), node("bb", vllm="0.31.1"), node("ccc", vllm=None)])
    assert what == "vllm differs between nodes: 0.32.0 on a (10.0.0.1); 0.31.1 on bb (10.0.0.2); not installed on ccc (10.0.0.3)"
    assert "install one vllm version on every node" in fix


def test_gpus_that_ray_counts_and_torch_does_not_see_are_a_problem():
    seen = node("a") | {"gpus": ["NVIDIA H100"] * 8}
    assert device_problems([seen], {"a": {"CPU": 64, "GPU": 8}}) == []
    [(what, _)] = device_problems([node("a")], {"a": {"CPU": 64, "GPU": 8}})
    assert what == "node a (10.0.0.1): Ray counts 8 GPU(s), torch sees 0"


def test_placement_is_checked_node_by_node_and_in_total():
    cfg = load_config(None, ["cluster.placement=disaggregated", "learner.num_ranks=2", "learner.num_cpus=4",
                             "generator.num_engines=2", "generator.num_cpus=2", "reward.num_workers=2"])
    fits = {"r": {"CPU": 4, "rollout": 1}, "l": {"CPU": 9, "learner": 1}}
    lines, problems = placement_problems(cfg, fits)
    assert problems == [], problems
    assert lines[0] == "rlsys-learners: 2 x {'CPU': 4.0, 'learner': 0.001} (PACK) -> 1 node(s) can hold one"
    assert lines[1].startswith("rlsys-generator-0 .. rlsys-generator-1 (2 groups): 1 x {'CPU': 2.0, 'rollout'")
    # the learner node is too small for one rank: no node holds the bundle (it declares the resource)
    _, problems = placement_problems(cfg, fits | {"l": {"CPU": 2, "learner": 1}})
    assert [p for p, _ in problems][0].endswith("no node can hold it: no node has that much of every resource")
    # each bundle fits somewhere, the sum does not: 2 x 4 (learners) + 2 x 2 + 0.5 CPUs > 4 + 4
    _, problems = placement_problems(cfg, {"r": {"CPU": 4, "rollout": 1}, "l": {"CPU": 4, "learner": 1}})
    assert [p for p, _ in problems] == ["the run asks for 12.5 CPU in all, the cluster has 8"]
    # under an autoscaler the missing nodes are to come: said, not a problem
    lines, problems = placement_problems(load_config(None, ["cluster.placement=disaggregated", "autoscale.enabled=true"]),
                                         {"l": {"CPU": 8, "learner": 1}})
    assert problems == [] and any(ln.startswith("not here yet (autoscale.enabled") and "rollout" in ln for ln in lines)


def test_strict_spread_learners_need_that_many_nodes():
    cfg = load_config(None, ["cluster.learners_per_node=1", "learner.num_ranks=4", "learner.num_cpus=1"])
    one = {"a": {"CPU": 16}}
    _, problems = placement_problems(cfg, one)
    assert any(p.startswith("rlsys-learners needs 4 different nodes, 1 can hold its bundles") for p, _ in problems), problems
    _, problems = placement_problems(cfg, {k: {"CPU": 16} for k in "abcd"})
    assert problems == []


def test_a_combination_refused_on_gpus_is_a_problem_there_only():
    cfg = load_config(None, ["cluster.placement=colocated", "learner.sync_by_handle=false"])
    _, problems = placement_problems(cfg, {"a": {"CPU": 16}})
    assert problems == []
    [(what, _)] = placement_problems(cfg, {"a": {"CPU": 16, "GPU": 8}})[1]
    assert "Duplicate GPU detected" in what
