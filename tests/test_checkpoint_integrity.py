"""Every checkpoint carries checksums.json (each file's size and sha256, written last inside the
atomic commit), and a resume checks it before any actor starts: a truncated, altered or missing
file stops the resume naming the file, what is wrong, and the newest older checkpoint whose
checksums match. A save that fails on a full disk leaves the previous checkpoint whole and named
by `latest`. Without Ray: these are plain functions (one test saves a real in-process learner)."""

from __future__ import annotations

import errno
import json
import subprocess
import sys

import pytest

from rlsys import checkpoint
from rlsys.checkpoint import (CHECKSUMS, TRACKER, DamagedCheckpoint, commit, export, find_resumable, list_checkpoints,
                              verify, write_trainer_state)
from rlsys.config import ConfigError, load_config
from rlsys.loops.resume import resume_point

WEIGHTS = "model.safetensors"
SAVE_TWICE = """
import sys
from pathlib import Path
from rlsys.actors.learner import Learner
from rlsys.actors.weight_sync import free_port
from rlsys.checkpoint import commit, write_trainer_state
from rlsys.config import AlgoConfig, LearnerConfig, ModelConfig
from rlsys.data.models import resolve_model

cfg = LearnerConfig(num_ranks=1, mini_batch_size=4, micro_batch_size=2, max_tokens_per_micro_batch=0)
learner = Learner(resolve_model(ModelConfig()), "float32", cfg, AlgoConfig(group_size=4, beta=0.0),
                  temperature=1.0, rank=0, world=1, backend="gloo", seed=0)
learner.setup("127.0.0.1", free_port())
for step in (1, 2):
    def write(folder):
        learner.save(str(folder))
        write_trainer_state(folder, {"step": step})

    commit(Path(sys.argv[1]), step, write)
"""
RANK_STATE = "learner/state/zero_pp_rank_0_mp_rank_00_optim_states.pt.safetensors"


def save(run_dir, step: int):
    """A checkpoint with the files a learner save writes (model, config, a rank's state file) and
    the driver's trainer state, through the real commit."""

    def write(folder):
        (folder / "config.json").write_text("{}")
        (folder / WEIGHTS).write_bytes(bytes(range(256)) * 40 + bytes([step]))
        (folder / RANK_STATE).parent.mkdir(parents=True)
        (folder / RANK_STATE).write_bytes(b"adam" * 1000 + bytes([step]))
        write_trainer_state(folder, {"step": step})

    return commit(run_dir, step, write)


def auto():
    return load_config(None, ["trainer.resume=auto"])


def test_commit_writes_a_checksum_for_every_file_and_export_leaves_it_out(tmp_path):
    folder = save(tmp_path, 2)
    files = json.loads((folder / CHECKSUMS).read_text())["files"]
    assert sorted(files) == ["config.json", RANK_STATE, WEIGHTS, "trainer_state.json"]
    assert files[WEIGHTS]["size"] == 256 * 40 + 1 and len(files[WEIGHTS]["sha256"]) == 64
    out = export(tmp_path, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", WEIGHTS]


def test_an_intact_checkpoint_passes(tmp_path, capsys):
    save(tmp_path, 2)
    save(tmp_path, 4)
    assert resume_point(auto(), tmp_path) == tmp_path / "checkpoints" / "step_4"
    assert f"step_4: 4 files (0.0 MiB) match its {CHECKSUMS}" in capsys.readouterr().out


def test_a_truncated_file_stops_the_resume_naming_it_and_the_previous_whole_checkpoint(tmp_path):
    save(tmp_path, 2)
    folder = save(tmp_path, 4)
    whole = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(whole[:100])
    with pytest.raises(DamagedCheckpoint) as e:
        resume_point(auto(), tmp_path)
    message = str(e.value)
    assert f"checkpoint {folder} is damaged: {WEIGHTS}: 100 bytes, {CHECKSUMS} recorded {len(whole)} (truncated)" in message
    step_2 = tmp_path / "checkpoints" / "step_2"
    assert f"newest older checkpoint whose checksums match is {step_2}; resume from it with trainer.resume={step_2}" \
        in message
    assert isinstance(e.value, ConfigError)  # the CLI prints it as one line, exit 2


def test_an_altered_byte_stops_the_resume_naming_the_file(tmp_path):
    save(tmp_path, 2)
    folder = save(tmp_path, 4)
    data = bytearray((folder / RANK_STATE).read_bytes())
    data[17] ^= 1
    (folder / RANK_STATE).write_bytes(bytes(data))
    with pytest.raises(DamagedCheckpoint, match=rf"{RANK_STATE}: sha256 differs from the one in {CHECKSUMS} "
                                                r"\(altered; same size, 4001 bytes\).*checksums match is .*step_2"):
        resume_point(auto(), tmp_path)


def test_a_missing_file_stops_the_resume_naming_it(tmp_path):
    save(tmp_path, 2)
    folder = save(tmp_path, 4)
    (folder / RANK_STATE).unlink()
    with pytest.raises(DamagedCheckpoint, match=rf"{RANK_STATE}: missing \({CHECKSUMS} lists it, 4001 bytes\)"):
        resume_point(auto(), tmp_path)


def test_an_explicit_path_is_checked_and_a_damaged_trainer_state_is_named_as_damage(tmp_path):
    save(tmp_path, 2)
    folder = save(tmp_path, 4)
    (folder / "trainer_state.json").write_text('{"step": 4,')  # cut short
    cfg = load_config(None, [f"trainer.resume={folder}"])
    with pytest.raises(DamagedCheckpoint, match=r"trainer_state.json: 11 bytes, .*\(truncated\).*checksums match is "
                                                r".*step_2"):
        resume_point(cfg, tmp_path / "elsewhere")


def test_no_whole_older_checkpoint_is_said_so(tmp_path):
    """The newest older checkpoint is damaged too (and its checksums.json is unreadable): the
    message says that none passes, and never names a damaged one as the way out."""
    first = save(tmp_path, 2)
    (first / CHECKSUMS).write_text("{")
    folder = save(tmp_path, 4)
    (folder / WEIGHTS).write_bytes(b"")
    with pytest.raises(DamagedCheckpoint, match=rf"No older checkpoint in {tmp_path / 'checkpoints'} passes its "
                                                r"checksums \(1 looked at\): start a new run"):
        resume_point(auto(), tmp_path)
    with pytest.raises(DamagedCheckpoint, match=rf"{CHECKSUMS}: not a checksums file rlsys wrote"):
        verify(first)


def test_a_checkpoint_written_before_checksums_is_resumed_with_a_note(tmp_path, capsys):
    """Checkpoints of earlier rlsys versions have no checksums.json: they are accepted, and the
    resume says that nothing could be checked. Offered as the way out too, saying the same."""
    old = save(tmp_path, 2)
    (old / CHECKSUMS).unlink()
    assert resume_point(load_config(None, [f"trainer.resume={old}"]), tmp_path) == old
    assert f"{old} has no {CHECKSUMS} (written before rlsys wrote checksums)" in capsys.readouterr().out
    folder = save(tmp_path, 4)
    (folder / WEIGHTS).write_bytes(b"x")
    with pytest.raises(DamagedCheckpoint, match=rf"newest older checkpoint is {old}, written before rlsys wrote "
                                                r"checksums \(it cannot be checked\)"):
        resume_point(auto(), tmp_path)


def test_a_file_the_save_did_not_write_is_noted_not_fatal(tmp_path, capsys):
    folder = save(tmp_path, 2)
    (folder / ".DS_Store").write_text("x")
    verify(folder)
    assert "holds 1 file(s) its save did not write, not checked: .DS_Store" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["files", "checksums"])
def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_whole_and_latest(tmp_path, monkeypatch, where):
    """ENOSPC half-way through the files, or while checksums.json is written: the error reaches
    the caller, the half folder is gone (its space given back) and never counted, step_2 stays
    whole (its checksums match) and `latest` still names it."""
    save(tmp_path, 2)
    full = OSError(errno.ENOSPC, "No space left on device")

    def half(folder):
        (folder / "config.json").write_text("{}")
        (folder / WEIGHTS).write_bytes(b"half")
        if where == "files":
            raise full

    def no_room(folder, elsewhere=None):
        raise full

    if where == "checksums":
        monkeypatch.setattr(checkpoint, "write_checksums", no_room)
    with pytest.raises(OSError) as e:
        commit(tmp_path, 4, half)
    assert e.value.errno == errno.ENOSPC
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [TRACKER, "step_2"]
    assert sorted(list_checkpoints(tmp_path)) == [2]
    assert (root / TRACKER).read_text().strip() == "step_2"
    assert find_resumable(tmp_path) == root / "step_2"
    verify(root / "step_2")


def test_a_real_learner_save_carries_checksums_and_a_truncated_weights_file_is_found(tmp_path):
    """The learner's own save (HF weights, tokenizer, DeepSpeed state under learner/) through
    commit, as rlsys.loops.train.save does it: every file it wrote is listed; the resume of a
    checkpoint whose weights were cut short stops naming the weights file and the older one."""
    # In a process of its own: a learner initialises torch.distributed and DeepSpeed's groups for
    # the life of the process, and later in-process learners of the suite (test_learner.py) must
    # not meet this one's.
    done = subprocess.run([sys.executable, "-c", SAVE_TWICE, str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "checkpoints" / "step_2"
    listed = json.loads((folder / CHECKSUMS).read_text())["files"]
    assert sorted(listed) == checkpoint.checkpoint_files(folder)
    assert WEIGHTS in listed and any(name.startswith("learner/") for name in listed)
    verify(folder)
    size = (folder / WEIGHTS).stat().st_size
    with open(folder / WEIGHTS, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(DamagedCheckpoint, match=rf"{WEIGHTS}: {size // 2} bytes, {CHECKSUMS} recorded {size} "
                                                rf"\(truncated\).*checksums match is {tmp_path / 'checkpoints' / 'step_1'}"):
        resume_point(auto(), tmp_path)
