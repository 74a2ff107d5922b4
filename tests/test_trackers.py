"""trainer.loggers: each tracker gets the config once, three steps and their samples through
RunLog(run_dir, cfg), and what it wrote is read back with its own reader."""

import glob
import json
import math
import posixpath
import struct
import sys
import zlib

import pyarrow.parquet
import pytest
from omegaconf import OmegaConf

from rlsys.config import load_config
from rlsys.observe.metrics import RunLog, read_jsonl
from rlsys.observe.trackers import flatten, make_tracker, mlflow_key, plottable, sample_markdown

NAN, INF = float("nan"), float("inf")
# Values exact in float32 (TensorBoard stores scalars as float32). Steps 1, 2, 5: the step
# numbers must come back as given, not as a count of calls. "note" is not a number: it stays in
# metrics.jsonl and is left out of the trackers; "loss" goes NaN then inf and must show as such.
STEPS = [
    (1, {"reward/mean": 0.25, "timing/generate": 1.5, "tokens/total": 96, "loss": 0.5, "note": "warm-up"}),
    (2, {"reward/mean": 0.5, "timing/generate": 1.25, "tokens/total": 128, "loss": NAN, "note": None}),
    (5, {"reward/mean": 0.75, "timing/generate": 1.0, "tokens/total": 160, "loss": INF}),
]
PLOTTED = ["reward/mean", "timing/generate", "tokens/total", "loss"]


def sample(step):
    # pipes, newlines and a code fence: a sample must come back character for character
    return {"prompt": f"What is {step}+{step}?\n| a | b |", "completion": f"<think>```x```</think> {2 * step}",
            "answer": str(2 * step), "reward": float(step % 2)}


def same(a, b):
    return a == b or (math.isnan(a) and math.isnan(b))


def write_run(tmp_path, loggers, caplog=None):
    cfg = load_config(overrides=[f"trainer.loggers=[{','.join(loggers)}]", "trainer.project=rlsys-test"])
    run_dir = tmp_path / "run-a"
    run_dir.mkdir()
    log = RunLog(run_dir, cfg)
    for step, metrics in STEPS:
        log.log(step, metrics, sample(step))
    log.close()
    # metrics.jsonl and samples.jsonl are written whatever the loggers
    assert [row["step"] for row in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 5]
    assert read_jsonl(run_dir / "samples.jsonl")[2] == {"step": 5, **sample(5)}
    return run_dir, OmegaConf.to_container(OmegaConf.structured(cfg))


def test_the_helpers_the_tracker_tests_compare_with_by_hand():
    """flatten and sample_markdown give the expected values of the tracker tests below: checked here
    against hand-written text, so a bug in them cannot hide in both sides of those comparisons."""
    assert flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": None, "f": [1, 2], "g": {}, "h": True}) == {
        "a.b": 1, "a.c.d": "x", "e": "null", "f": "[1, 2]", "g": "{}", "h": True}
    assert sample_markdown(1, sample(1)) == (
        "**step** 1 · **reward** 1.0 · **answer** `2`\n\n"
        "**prompt**\n\n~~~~\nWhat is 1+1?\n| a | b |\n~~~~\n\n"
        "**completion**\n\n~~~~\n<think>```x```</think> 2\n~~~~\n")


def test_tensorboard(tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir, config = write_run(tmp_path, ["tensorboard"])
    # one warning for "note" (a str at step 1, None at step 2), not one per step
    assert [r.getMessage() for r in caplog.records if "note" in r.getMessage()] == [
        "metric 'note' is str, not a number: left out of the trackers (it stays in metrics.jsonl)"]
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == sorted(PLOTTED)
    for name in PLOTTED:
        got = [(e.step, e.value) for e in acc.Scalars(name)]
        assert [s for s, _ in got] == [1, 2, 5]
        assert all(same(v, float(m[name])) for (_, v), (_, m) in zip(got, STEPS)), (name, got)
    texts = [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors("samples/text_summary")]
    assert texts == [(step, sample_markdown(step, sample(step))) for step, _ in STEPS]
    assert sample(2)["completion"] in texts[1][1]
    assert len(acc.Tensors("config/text_summary")) == 1

    # the config as hparams, once
    starts = [v for f in glob.glob(str(run_dir / "tensorboard" / "events.*"))
              for event in EventFileLoader(f).Load() for v in event.summary.value
              if v.tag == "_hparams_/session_start_info"]
    assert len(starts) == 1
    data = plugin_data_pb2.HParamsPluginData.FromString(starts[0].metadata.plugin_data.content)
    hparams = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
               for k, v in data.session_start_info.hparams.items()}
    assert hparams == flatten(config)
    assert hparams["trainer.project"] == "rlsys-test" and hparams["trainer.loggers"] == '["tensorboard"]'


def read_wandb_records(path):
    """The records of a .wandb file (W&B's LevelDB-style log of protobuf records; wandb 0.31
    ships no Python reader): a 7-byte file header, then 32 KiB blocks of chunks, each with a
    CRC-32, a length and a kind (full, first, middle, last)."""
    from wandb.proto import wandb_internal_pb2

    raw = open(path, "rb").read()
    assert struct.unpack("<4sHB", raw[:7]) == (b":W&B", 0xBEE1, 0)
    block, header = 32768, 7
    pos, parts, records = 7, [], []
    while pos + header <= len(raw):
        left = block - pos % block
        crc, length, kind = struct.unpack("<IHB", raw[pos:pos + header]) if left >= header else (0, 0, 0)
        if kind == 0:   # the zero padding at the end of a block
            pos += left
            continue
        data = raw[pos + header:pos + header + length]
        assert zlib.crc32(data, zlib.crc32(bytes([kind]))) == crc, f"checksum at byte {pos}"
        parts.append(data)
        pos += header + length
        if kind in (1, 4):   # full, last
            records.append(wandb_internal_pb2.Record.FromString(b"".join(parts)))
            parts = []
    assert not parts and pos == len(raw), "the file ends inside a record"
    return records


def test_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir, config = write_run(tmp_path, ["jsonl", "wandb"])
    [path] = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = read_wandb_records(path)
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name) == ("rlsys-test", "run-a")

    updates = [item for r in records if r.WhichOneof("record_type") == "config" for item in r.config.update]
    updates += list(run.config.update)
    logged = [item.key for item in updates if item.key in config]
    assert sorted(logged) == sorted(config)   # every section, once
    assert {item.key: json.loads(item.value_json) for item in updates if item.key in config} == config

    history = {r.history.step.num: {item.nested_key[0]: json.loads(item.value_json) for item in r.history.item
                                     if len(item.nested_key) == 1}
               for r in records if r.WhichOneof("record_type") == "history"}
    assert sorted(history) == [1, 2, 5]
    for step, metrics in STEPS:
        got = {k: v for k, v in history[step].items() if not k.startswith("_")}
        assert got.keys() == set(PLOTTED)
        assert all(same(got[k], float(metrics[k])) for k in PLOTTED), (step, got)

    tables = {r.history.step.num: json.loads(item.value_json) for r in records
              if r.WhichOneof("record_type") == "history" for item in r.history.item
              if list(item.nested_key) == ["samples", "path"]}
    files = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "files"))[0]
    for step, _ in STEPS:
        table = json.load(open(f"{files}/{tables[step]}"))
        assert table["columns"] == ["step", "prompt", "completion", "answer", "reward"]
        assert table["data"] == [[step, *sample(step).values()]]


def test_mlflow(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)   # nothing may land in the working directory
    run_dir, config = write_run(tmp_path, ["mlflow"])
    assert list(elsewhere.iterdir()) == []

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rlsys-test")
    [run] = client.search_runs([experiment.experiment_id])
    assert (run.info.run_name, run.info.status) == ("run-a", "FINISHED")
    assert run.data.params == {k: str(v) for k, v in flatten(config).items()}
    assert run.data.metrics.keys() == set(PLOTTED)
    for name in PLOTTED:
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
        # MLflow's database keeps NaN and stores +inf as the largest float
        want = [(step, sys.float_info.max if m[name] == INF else float(m[name])) for step, m in STEPS]
        assert [s for s, _ in got] == [s for s, _ in want]
        assert all(same(a, b) for (_, a), (_, b) in zip(got, want)), (name, got)

    artifacts = tmp_path / "artifacts"
    client.download_artifacts(run.info.run_id, "samples.parquet", str(artifacts))
    table = pyarrow.parquet.read_table(artifacts / "samples.parquet")
    assert table.column_names == ["step", "prompt", "completion", "answer", "reward"]
    assert table.to_pylist() == [{"step": step, **sample(step)} for step, _ in STEPS]
    client.download_artifacts(run.info.run_id, "config.yaml", str(artifacts))
    assert OmegaConf.to_container(OmegaConf.load(artifacts / "config.yaml")) == config
    assert (run_dir / "mlruns" / "artifacts").is_dir()


def test_mlflow_key():
    from mlflow.utils.validation import _validate_metric_name

    assert mlflow_key("reward/mean") == "reward/mean"
    assert mlflow_key("timing/generate") == "timing/generate"
    assert mlflow_key("pass@1 (greedy)") == "pass_1 _greedy_"
    assert mlflow_key("/a//b/./c/..:d") == "_/a/_/b/_/c/.._d"
    assert mlflow_key("a/../b") == "a/__/b"
    for name in ["/a//b/./c/..:d", "a/../b", "x/", "./y", "é+ü"]:
        key = mlflow_key(name)
        assert posixpath.normpath(key) == key
        _validate_metric_name(key)   # raises when MLflow would refuse it


def test_mlflow_key_collision(tmp_path):
    cfg = load_config(overrides=["trainer.loggers=[mlflow]"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    log = RunLog(run_dir, cfg)
    with pytest.raises(ValueError, match=r"'a@b' and 'a#b' both become the MLflow key 'a_b'"):
        log.log(1, {"a@b": 1.0, "a#b": 2.0}, sample(1))
    log.close()


@pytest.mark.parametrize("logger, module", [("tensorboard", "tensorboard"), ("wandb", "wandb"),
                                            ("mlflow", "mlflow")])
def test_missing_package_names_the_logger_and_extra(tmp_path, monkeypatch, logger, module):
    monkeypatch.setitem(sys.modules, module, None)   # `import module` now fails as if not installed
    cfg = load_config(overrides=[f"trainer.loggers=[jsonl,{logger}]"])
    with pytest.raises(ModuleNotFoundError, match=rf"trainer.loggers has '{logger}'.*pip install 'rlsys\[track\]'"):
        RunLog(tmp_path, cfg)


def test_unknown_tracker(tmp_path):
    with pytest.raises(ValueError, match=r"unknown tracker 'neptune'; choose from jsonl, tensorboard, wandb, mlflow"):
        make_tracker("neptune", tmp_path, load_config().trainer)


def test_plain_runlog_writes_the_files_only(tmp_path):
    log = RunLog(tmp_path)
    log.log(1, {"reward/mean": 0.5}, sample(1))
    log.close()
    assert log.trackers == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "samples.jsonl"]
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "reward/mean": 0.5}]


class FakeTracker:
    def __init__(self, error=None):
        self.error, self.closed = error, False

    def close(self):
        self.closed = True
        if self.error:
            raise self.error


def test_close_closes_every_tracker_and_raises(tmp_path):
    log = RunLog(tmp_path)
    trackers = {"a": FakeTracker(OSError("disk full")), "b": FakeTracker()}
    log.trackers = dict(trackers)
    with pytest.raises(OSError, match="disk full"):
        log.close()
    assert trackers["b"].closed and log.metrics.closed and log.samples.closed

    log = RunLog(tmp_path)
    trackers = {"a": FakeTracker(OSError("disk full")), "b": FakeTracker(RuntimeError("no network"))}
    log.trackers = dict(trackers)
    with pytest.raises(RuntimeError, match=r"for a \(OSError: disk full\), b \(RuntimeError: no network\)"):
        log.close()


def test_plottable_keeps_real_numbers_and_warns_once_per_name(caplog):
    import numpy as np

    warned = set()
    got = plottable({"a": np.float32(0.5), "b": np.int64(3), "c": True, "d": NAN, "e": None, "f": "x", "g": [1]},
                    warned)
    assert got.keys() == {"a", "b", "c", "d"} and all(type(v) is float for v in got.values())
    assert (got["a"], got["b"], got["c"]) == (0.5, 3.0, 1.0) and math.isnan(got["d"])
    plottable({"e": "now a string"}, warned)
    assert warned == {"e", "f", "g"}
    assert [r.getMessage().split(" is ")[0] for r in caplog.records] == ["metric 'e'", "metric 'f'", "metric 'g'"]
