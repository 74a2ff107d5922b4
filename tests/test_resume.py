"""Checkpoint bookkeeping and the driver's side of a resume, without Ray: atomic commits, the
`latest` tracker, keep_last, which checkpoint a resume picks, the config check, the prompt
stream's position (at an epoch boundary too), and the logs cut back to the checkpoint."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from rlsys.checkpoint import TRACKER, commit, find_resumable, list_checkpoints, read_trainer_state, write_trainer_state
from rlsys.config import ConfigError, DataConfig, load_config
from rlsys.data.prompts import DataError, PromptStream
from rlsys.loops.resume import check_same_run, cut_logs, driver_state, restore_driver, resume_point


REPO = Path(__file__).resolve().parent.parent


def fake_checkpoint(folder, step: int) -> None:
    (folder / "config.json").write_text("{}")
    write_trainer_state(folder, {"step": step})


def test_commit_renames_a_whole_folder_then_names_it_latest(tmp_path):
    commit(tmp_path, 2, lambda f: fake_checkpoint(f, 2))
    assert (tmp_path / "checkpoints" / TRACKER).read_text().strip() == "step_2"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_2"]


def test_a_failed_write_leaves_the_previous_checkpoint_and_the_tracker(tmp_path):
    commit(tmp_path, 2, lambda f: fake_checkpoint(f, 2))

    def half(folder):
        (folder / "config.json").write_text("{}")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        commit(tmp_path, 4, half)
    assert sorted(list_checkpoints(tmp_path)) == [2]  # step_4.partial never counts
    assert find_resumable(tmp_path).name == "step_2"
    commit(tmp_path, 4, lambda f: fake_checkpoint(f, 4))  # the next save clears the leftover
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_2", "step_4"]


def test_keep_last_removes_only_older_whole_checkpoints(tmp_path):
    for step in (2, 4, 6):
        commit(tmp_path, step, lambda f, s=step: fake_checkpoint(f, s), keep_last=2)
    assert sorted(list_checkpoints(tmp_path)) == [4, 6]
    assert find_resumable(tmp_path).name == "step_6"


def test_resume_finds_the_newest_whole_checkpoint_without_a_tracker(tmp_path):
    """A tracker that was never written (or names a folder that is gone) must not turn a resume
    into a fresh start: the newest whole checkpoint is used."""
    for step in (2, 4):
        commit(tmp_path, step, lambda f, s=step: fake_checkpoint(f, s))
    (tmp_path / "checkpoints" / TRACKER).unlink()
    assert find_resumable(tmp_path).name == "step_4"
    (tmp_path / "checkpoints" / TRACKER).write_text("step_9\n")
    assert find_resumable(tmp_path).name == "step_4"


def test_a_resume_request_without_a_checkpoint_stops(tmp_path):
    cfg = load_config(None, ["trainer.resume=auto"])
    with pytest.raises(FileNotFoundError, match="no whole checkpoint"):
        resume_point(cfg, tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "step_2").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step_2" / "config.json").write_text("{}")  # weights only
    with pytest.raises(FileNotFoundError, match="no whole checkpoint"):
        resume_point(cfg, tmp_path / "run")
    cfg = load_config(None, [f"trainer.resume={tmp_path / 'run' / 'checkpoints' / 'step_2'}"])
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        resume_point(cfg, tmp_path / "other")
    assert resume_point(load_config(None, []), tmp_path / "run") is None


def test_a_resumed_config_must_describe_the_same_run():
    cfg = load_config(None, [])
    saved = driver_state(2, 2, PromptStream(cfg.data, seed=0), cfg)["config"]
    check_same_run(saved, load_config(None, ["generator.num_engines=4", "trainer.resume=auto", "eval.every=5"]))
    with pytest.raises(ConfigError, match=r"learner.lr: 1e-06 -> 0.5|learner.lr: .* -> 0.5"):
        check_same_run(saved, load_config(None, ["learner.lr=0.5"]))
    with pytest.raises(ConfigError, match="trainer.seed: 0 -> 3"):
        check_same_run(saved, load_config(None, ["trainer.seed=3"]))
    check_same_run(saved, load_config(None, [f"trainer.total_steps={cfg.trainer.total_steps + 10}",
                                             "learner.lr_schedule=constant"]))
    saved_cosine = driver_state(2, 2, PromptStream(cfg.data, seed=0), load_config(None, ["learner.lr_schedule=cosine"]))
    with pytest.raises(ConfigError, match="spans total_steps"):
        check_same_run(saved_cosine["config"], load_config(None, ["learner.lr_schedule=cosine", "trainer.total_steps=7"]))


@pytest.mark.parametrize("taken", [3, 8, 16])  # 16: exactly at the end of the first epoch
def test_the_driver_state_round_trips_through_json_and_continues_the_prompt_stream(tmp_path, taken):
    rows = (REPO / "configs" / "data" / "toy_digits.jsonl").read_text().splitlines()[:16]
    (tmp_path / "rows.jsonl").write_text("\n".join(rows) + "\n")
    cfg = load_config(None, [])
    cfg.data = DataConfig(path=str(tmp_path / "rows.jsonl"), prompts_per_step=1)
    ran = PromptStream(cfg.data, seed=7)
    for _ in range(taken):
        ran.next()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = json.loads(json.dumps(driver_state(taken, taken, ran, cfg)))
    expected = ([p.index for _ in range(20) for p in ran.next()], random.random(), np.random.rand(), torch.rand(1))
    resumed = PromptStream(cfg.data, seed=7)
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    assert restore_driver(state, resumed) == (taken, taken)
    got = ([p.index for _ in range(20) for p in resumed.next()], random.random(), np.random.rand(), torch.rand(1))
    assert got == expected
    (tmp_path / "rows.jsonl").write_text("\n".join(rows[:15]) + "\n")  # the data changed since
    with pytest.raises(DataError, match="saved over 16 rows and the data now has 15"):
        restore_driver(state, PromptStream(cfg.data, seed=7))


def test_logs_are_cut_back_to_the_checkpoint_step(tmp_path):
    lines = [json.dumps({"step": s, "x": s}) for s in range(5)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "samples.jsonl").write_text("\n".join(lines[:4]) + '\n{"step": 4, "x"')  # cut by a kill
    assert cut_logs(tmp_path, 3) == 2 + 2
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert [json.loads(x)["step"] for x in (tmp_path / "samples.jsonl").read_text().splitlines()] == [0, 1, 2]
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\nnot json\n{"step": 1}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        cut_logs(tmp_path, 1)
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n7\n{"step": 1}\n')  # JSON, but not a record
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        cut_logs(tmp_path, 1)


def test_trainer_state_is_required_to_resume(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights only"):
        read_trainer_state(tmp_path)


def test_state_trees_round_trip_through_json_and_safetensors(tmp_path):
    """What DeepSpeed's state holds comes back with its types: int keys, tuples, sets, ordered
    dicts, sizes, dtypes, NaN, views of one buffer (stored apart), DeepSpeed's enum and objects."""
    from collections import OrderedDict

    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from rlsys.actors import state_tree

    flat = torch.arange(6.0)
    tree = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": flat[:3]}, 1: {"exp_avg": flat[3:]}},
            "param_groups": [{"params": [0, 1], "betas": (0.9, 0.999), "foreach": None, "lr": float("nan")}],
            "shapes": [OrderedDict([("w", torch.Size([2, 3]))])], "names": {"a", "b"}, "dtype": torch.bfloat16,
            "stage": ZeroStageEnum.optimizer_states, "slices": OrderedDict(w=fragment_address(numel=6, start=0)),
            "__odd": "a key like a tag", "rng": torch.get_rng_state()}
    state_tree.save(tree, tmp_path / "s.pt")
    got = state_tree.load(tmp_path / "s.pt")
    assert got["state"][0]["step"].item() == 3.0 and torch.equal(got["state"][1]["exp_avg"], flat[3:])
    assert got["param_groups"][0]["betas"] == (0.9, 0.999) and got["param_groups"][0]["lr"] != got["param_groups"][0]["lr"]
    assert got["shapes"] == [OrderedDict([("w", torch.Size([2, 3]))])] and isinstance(got["shapes"][0], OrderedDict)
    assert got["names"] == {"a", "b"} and got["dtype"] is torch.bfloat16 and got["__odd"] == "a key like a tag"
    assert got["stage"] is ZeroStageEnum.optimizer_states
    assert got["slices"]["w"] == fragment_address(numel=6, start=0)
    assert torch.equal(got["rng"], tree["rng"])


def test_a_state_file_rlsys_did_not_write_stops_naming_it(tmp_path):
    """A DeepSpeed pickle (a checkpoint from another tool), a missing tensor file, a name that is
    not a dtype: each stops with the file and the reason, and nothing is unpickled or called."""
    from rlsys.actors import state_tree

    torch.save({"x": torch.zeros(2)}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match=r"pickled.pt: not a state file rlsys wrote"):
        state_tree.load(tmp_path / "pickled.pt")
    (tmp_path / "alone.pt").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"alone.pt.safetensors: missing"):
        state_tree.load(tmp_path / "alone.pt")
    state_tree.save({"d": torch.float32}, tmp_path / "d.pt")
    (tmp_path / "d.pt").write_text(json.dumps({"d": {"__dtype__": "load"}}))
    with pytest.raises(TypeError, match="names dtype 'load', which is not a torch dtype"):
        state_tree.load(tmp_path / "d.pt")


def test_a_broken_trainer_state_stops_naming_the_file(tmp_path):
    (tmp_path / "trainer_state.json").write_text('{"step": 2,')  # cut short
    with pytest.raises(ValueError, match=r"trainer_state.json: not valid JSON .* give an earlier one"):
        read_trainer_state(tmp_path)


def test_doctests():
    import doctest

    from rlsys import checkpoint
    from rlsys.cluster import learners

    assert doctest.testmod(checkpoint).failed == 0 and doctest.testmod(learners).failed == 0


@pytest.mark.parametrize("size", [0, 1, 4096, 4096 * 3, 10_000])  # empty, tiny, one chunk, a multiple, a tail
def test_state_files_travel_in_chunks_and_land_whole_in_any_order(tmp_path, size):
    """A rank that cannot read the run folder gets its files as (name, offset, chunk): no chunk
    larger than asked, and the chunks make the same file whatever order they arrive in."""
    from rlsys.checkpoint import file_chunks, write_chunk

    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "learner" / "state").mkdir(parents=True)
    blob = bytes(random.Random(size).getrandbits(8) for _ in range(size))
    (src / "learner" / "state" / "f.pt").write_bytes(blob)
    chunks = list(file_chunks(src, ["learner/state/f.pt"], chunk_bytes=4096))
    assert all(len(data) <= 4096 for _, _, data in chunks) and len(chunks) == max(1, -(-size // 4096))
    random.Random(0).shuffle(chunks)
    for chunk in chunks:
        write_chunk(dst, *chunk)
    assert (dst / "learner" / "state" / "f.pt").read_bytes() == blob


def test_a_rank_is_sent_its_own_partition_and_the_shared_files(tmp_path):
    from rlsys.checkpoint import rank_state_files

    state = tmp_path / "learner" / "state"
    state.mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 "zero_pp_rank_1_mp_rank_00_optim_states.pt", "zero_pp_rank_10_mp_rank_00_optim_states.pt"):
        (state / name).write_text("x")
    (tmp_path / "model.safetensors").write_text("weights: not read by a resume")
    assert rank_state_files(tmp_path, 1) == ["learner/state/mp_rank_00_model_states.pt",
                                             "learner/state/zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_chunks_are_sent_with_at_most_two_in_flight_and_read_only_when_sent():
    """The driver's side of the stream: it reads a chunk only when it may send it, and waits for
    the oldest before a third is out, so it never holds more than two chunks of a rank's files."""
    from rlsys.cluster.learners import send_bounded

    read, outstanding, most, log = [0], set(), [0, 0], []

    def chunks():
        for i in range(7):
            read[0] += 1
            yield (i,)

    def submit(i):
        outstanding.add(i)
        most[0] = max(most[0], len(outstanding))
        most[1] = max(most[1], read[0] - len(log))  # read but not yet confirmed
        return i

    def wait(ref):
        outstanding.remove(ref)
        log.append(ref)

    assert send_bounded(chunks(), submit, wait, in_flight=2) == 7
    assert log == list(range(7)) and not outstanding
    assert most == [2, 2]


def test_each_state_file_reaches_each_node_once():
    """Ranks on one node share the folder they receive into: the module states (the whole model,
    under ZeRO-0 its optimizer too) go to one rank of each node, every partition to its rank."""
    from rlsys.cluster.learners import deliveries

    wanted = [["m", f"z{r}"] for r in range(5)]
    plan = deliveries([True, True, False, True, True], ["a", "a", "head", "b", "a"], wanted)
    assert plan == {0: ["m", "z0"], 1: ["z1"], 3: ["m", "z3"], 4: ["z4"]}
    assert deliveries([False, False], ["head", "head"], [[], []]) == {}


def test_ranks_ship_their_part_only_where_they_cannot_see_the_run_folder():
    from rlsys.cluster.learners import shipping

    assert shipping(["head", "a", "a"], "head", shared_storage=False) == [False, True, True]
    assert shipping(["a", "head"], "head", shared_storage=False) == [True, False]  # rank 0 alone is not the rule
    assert shipping(["a", "b"], "head", shared_storage=True) == [False, False]


def test_a_save_warns_when_the_checkpoints_to_come_do_not_fit_the_disk(tmp_path, monkeypatch, capsys):
    """keep_last=0 keeps every checkpoint: the driver says so when the run folder's disk cannot
    hold the ones still to come, and names a keep_last that fits; with room, nothing is said."""
    import shutil as sh

    from rlsys import checkpoint

    def blob(folder, step):
        fake_checkpoint(folder, step)
        (folder / "model.safetensors").write_bytes(b"\0" * 1000)

    real = sh.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: real._replace(free=5500))
    commit(tmp_path, 1, lambda f: blob(f, 1), keep_last=0, saves_left=9)
    out = capsys.readouterr().out
    size = sum(e["size"] for e in checkpoint.read_checksums(tmp_path / "checkpoints" / "step_1").values())
    assert "warning" in out and "the 9 checkpoint(s) still to write" in out and "every checkpoint is kept" in out
    assert f"trainer.keep_last={(5500 + size) // size - 1}" in out
    commit(tmp_path, 2, lambda f: blob(f, 2), keep_last=3, saves_left=1)  # one more fits
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: real._replace(free=10))
    commit(tmp_path, 3, lambda f: blob(f, 3), keep_last=0)  # unknown count: the next one
    assert "the next checkpoint need" in capsys.readouterr().out
    assert sorted(list_checkpoints(tmp_path)) == [1, 2, 3]  # a warning, nothing removed unasked


def test_a_storage_uri_run_is_checked_before_it_starts(tmp_path):
    from rlsys.cluster.storage import open_run_storage

    assert open_run_storage(str(tmp_path / "plain"), "", tmp_path / "stage") is None
    (tmp_path / "uri").mkdir()
    (tmp_path / "uri" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="already holds a run"):
        open_run_storage(f"file://{tmp_path}/uri", "", tmp_path / "stage")
    # trainer.resume=auto continues it (tests/test_storage_ranks.py: from the storage's checkpoints)
    assert open_run_storage(f"file://{tmp_path}/uri", "auto", tmp_path / "stage").uri == f"file://{tmp_path}/uri"
