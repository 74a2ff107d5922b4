"""Checkpoints written and resumed rank by rank at a storage URI (rlsys/cluster/storage.py), without
a Ray cluster: RunStorage's put/get with checksums, a checkpoint committed with files the "ranks"
put on the storage themselves, and the resume's checks of what the storage holds. The same on
learner nodes that share only the storage: tests/test_nodes_resume.py."""

from __future__ import annotations

import json

import pytest

from rlsys.checkpoint import CHECKSUMS, DamagedCheckpoint, commit, rank_files, read_checksums, sha256_of
from rlsys.cluster.storage import RunStorage, StorageError, open_run_storage
from rlsys.config import Config, ConfigError
from rlsys.loops.resume import resume_point


def test_put_and_get_round_trip_with_checksums(tmp_path):
    blob = bytes(range(256)) * 40_000 + b"tail"  # 9.8 MiB: two 8 MiB chunks
    (tmp_path / "a.bin").write_bytes(blob)
    storage = RunStorage(f"file://{tmp_path}/bucket/run", tmp_path / "stage")
    sent = storage.put(tmp_path / "a.bin", "checkpoints/step_1/learner/a.bin")
    assert sent == {"size": len(blob), "sha256": sha256_of(tmp_path / "a.bin")}
    assert (tmp_path / "bucket/run/checkpoints/step_1/learner/a.bin").read_bytes() == blob
    got = storage.get("checkpoints/step_1/learner/a.bin", tmp_path / "node" / "a.bin", want=sent)
    assert got == sent and (tmp_path / "node" / "a.bin").read_bytes() == blob
    assert not [p for p in tmp_path.rglob("*") if ".partial" in p.name], "no temporary file left on either side"


def test_a_truncated_file_on_the_storage_is_caught_naming_it(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 1000)
    uri = f"file://{tmp_path}/bucket/run"
    storage = RunStorage(uri, tmp_path / "stage")
    sent = storage.put(tmp_path / "a.bin", "ck/a.bin")
    stored = tmp_path / "bucket/run/ck/a.bin"
    stored.write_bytes(b"x" * 600)  # cut short on the storage
    with pytest.raises(StorageError, match=f"{uri}/ck/a.bin is damaged: 600 bytes, checksums.json recorded 1000"):
        storage.get("ck/a.bin", tmp_path / "node" / "a.bin", want=sent)
    assert not (tmp_path / "node" / "a.bin").exists()
    with pytest.raises(DamagedCheckpoint, match=r"ck is damaged: a.bin: 600 bytes, checksums.json recorded 1000 "
                                                r"\(truncated\)"):
        storage.check_sizes("ck", {"a.bin": sent})
    stored.write_bytes(b"y" * 1000)  # the same size, other bytes: only the sha256 tells
    storage.check_sizes("ck", {"a.bin": sent})
    with pytest.raises(StorageError, match=f"{uri}/ck/a.bin is damaged: sha256 differs"):
        storage.get("ck/a.bin", tmp_path / "node" / "a.bin", want=sent)


def ranks_put(storage: RunStorage, folder, parts: dict[str, bytes]) -> dict:
    """What LearnerGroup.save does with storage, without Ray: each file written on a 'node' and
    put straight to the checkpoint's final name on the storage; their entries returned."""
    rel = storage.remote_path(folder)
    assert rel is not None and not rel.endswith(".partial")
    out = {}
    for name, data in parts.items():
        local = storage.local.parent / "node" / name
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(data)
        out[name] = storage.put(local, f"{rel}/{name}")
    return out


PARTS = {"config.json": b"{}", "model.safetensors": b"w" * 5000,
         "learner/state/mp_rank_00_model_states.safetensors": b"m" * 300,
         "learner/state/zero_pp_rank_0_mp_rank_00_optim_states.safetensors": b"0" * 200,
         "learner/state/zero_pp_rank_1_mp_rank_00_optim_states.safetensors": b"1" * 200}


def saved_run(tmp_path, steps=(1, 2)) -> tuple[str, RunStorage]:
    uri = f"file://{tmp_path}/bucket/run"
    storage = RunStorage(uri, tmp_path / "stage")
    storage.local.mkdir(parents=True)
    for step in steps:
        with open(storage.local / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step - 1}) + "\n")

        def write(folder, step=step):
            uploaded = ranks_put(storage, folder, PARTS)
            (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
            return uploaded

        commit(storage.local, step, write)
        storage.upload()
    return uri, storage


def test_a_checkpoint_on_storage_lists_every_ranks_file_and_the_driver_sends_only_its_own(tmp_path):
    uri, storage = saved_run(tmp_path)
    on_storage = tmp_path / "bucket/run/checkpoints/step_2"
    listed = read_checksums(on_storage)
    assert sorted(listed) == sorted([*PARTS, "trainer_state.json"])
    assert all(listed[n] == {"size": len(d), "sha256": sha256_of(on_storage / n)} for n, d in PARTS.items())
    staged = storage.local / "checkpoints" / "step_2"
    assert sorted(p.name for p in staged.iterdir()) == [CHECKSUMS, "trainer_state.json"], "no rank's file staged"
    assert (tmp_path / "bucket/run/checkpoints/latest").read_text().strip() == "step_2"
    assert rank_files(sorted(listed), 1) == ["learner/state/mp_rank_00_model_states.safetensors",
                                             "learner/state/zero_pp_rank_1_mp_rank_00_optim_states.safetensors"]


def test_upload_sends_checksums_after_the_files_and_latest_last(tmp_path, monkeypatch):
    storage = RunStorage(f"file://{tmp_path}/bucket/run", tmp_path / "stage")
    for rel in ("checkpoints/latest", "checkpoints/step_2/checksums.json", "checkpoints/step_2/trainer_state.json",
                "metrics.jsonl", "checkpoints/step_2/zz.json"):
        (storage.local / rel).parent.mkdir(parents=True, exist_ok=True)
        (storage.local / rel).write_text("x")
    order = storage.upload()
    assert order[-2:] == ["checkpoints/step_2/checksums.json", "checkpoints/latest"], order


def test_resume_auto_from_a_uri_fetches_only_the_drivers_files_and_checks_sizes(tmp_path):
    uri, _ = saved_run(tmp_path)
    cfg = Config()
    cfg.trainer.output_dir, cfg.trainer.resume = uri, "auto"
    with pytest.raises(FileExistsError, match="already holds a run"):  # a fresh run: refused as before
        open_run_storage(uri, "", tmp_path / "stage2")
    storage = open_run_storage(uri, "auto", tmp_path / "stage2")
    found = resume_point(cfg, storage.local, storage)
    assert found == storage.local / "checkpoints" / "step_2"
    assert sorted(p.name for p in found.iterdir()) == [CHECKSUMS, "trainer_state.json"]
    assert json.loads((found / "trainer_state.json").read_text()) == {"step": 2}
    assert (storage.local / "metrics.jsonl").read_text().count("\n") == 2  # appended to, then uploaded whole
    assert storage.upload() == [], "what was fetched counts as on the storage"
    assert storage.remote_path(found) == "checkpoints/step_2"

    (tmp_path / "bucket/run/checkpoints/step_2/model.safetensors").write_bytes(b"w" * 10)  # cut short
    again = RunStorage(uri, tmp_path / "stage3")
    with pytest.raises(DamagedCheckpoint, match=r"checkpoint .*/bucket/run/checkpoints/step_2 is damaged: "
                                                r"model.safetensors: 10 bytes, checksums.json recorded 5000"):
        resume_point(cfg, again.local, again)


def test_resume_auto_from_a_uri_without_a_whole_checkpoint_stops(tmp_path):
    cfg = Config()
    cfg.trainer.resume = "auto"
    storage = RunStorage(f"file://{tmp_path}/bucket/empty", tmp_path / "stage")
    with pytest.raises(FileNotFoundError, match="holds no whole checkpoint"):
        resume_point(cfg, storage.local, storage)
    # A save killed after the ranks' parts but before the driver's checksums.json: `latest` still
    # names the previous one, and a `latest` naming a folder without one is refused.
    uri, storage = saved_run(tmp_path / "k", steps=(1,))
    ranks_put(storage, storage.local / "checkpoints" / "step_2.partial", PARTS)
    assert resume_point(cfg, tmp_path / "s2", RunStorage(uri, tmp_path / "s2")).name == "step_1"
    (tmp_path / "k/bucket/run/checkpoints/latest").write_text("step_2\n")
    with pytest.raises(DamagedCheckpoint, match="names step_2, which has no checksums.json"):
        resume_point(cfg, tmp_path / "s3", RunStorage(uri, tmp_path / "s3"))


def test_resume_from_a_checkpoint_uri_is_refused_with_the_way_to_do_it(tmp_path):
    cfg = Config()
    cfg.trainer.resume = f"file://{tmp_path}/run/checkpoints/step_2"
    with pytest.raises(ConfigError, match="trainer.resume=auto and trainer.output_dir=<the run's URI>"):
        resume_point(cfg, tmp_path / "stage")
