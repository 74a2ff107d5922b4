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
