"""R1's multi-stage pipeline (rlsys.loops.pipeline) on the tiny model: the stages chain, a re-run
skips finished stages, a stage killed halfway resumes from its checkpoint; bad pipeline files
stop with the stage named; `rlsys sample` keeps what its rules say and records its provenance."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from rlsys.config import ConfigError, load_config
from rlsys.data.models import resolve_model
from rlsys.loops.pipeline import load_pipeline

REPO = Path(__file__).resolve().parent.parent
SMALL = ["generator.num_engines=1", "learner.num_ranks=1", "learner.micro_batch_size=4", "reward.num_workers=1",
         "trainer.progress=false"]


def rlsys_proc(*args: str) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("rlsys")
    return subprocess.Popen([str(exe), *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)


def rlsys(*args: str) -> subprocess.CompletedProcess:
    proc = rlsys_proc(*args)
    out, err = proc.communicate(timeout=900)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def write_pipeline(tmp_path: Path, stages: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"""
config: configs/tiny.yaml
overrides: [{", ".join(SMALL)}, trainer.save_every=2]
output_dir: {tmp_path / "out"}
base: tiny
eval: {{dataset: digit_add, split: test, limit: 4, k: 2}}
stages:
{stages}
""")
    return path


STAGES = """
  - {name: rl, kind: train, model: base, overrides: [trainer.total_steps=2]}
  - {name: traces, kind: sample, model: rl, dataset: configs/data/toy_digits.jsonl, limit: 8, k: 2, keep: all}
  - {name: cold_start, kind: sft, model: base, data: traces,
     overrides: [sft.epochs=3, learner.mini_batch_size=4]}
"""


def test_pipeline_chains_skips_done_stages_and_resumes_a_killed_one(tmp_path):
    path = write_pipeline(tmp_path, STAGES)
    out = tmp_path / "out"
    # First run, killed once the SFT stage has written its first checkpoint.
    proc = rlsys_proc("pipeline", str(path))
    ckpt = out / "cold_start" / "run" / "checkpoints" / "step_2" / "trainer_state.json"
    deadline = time.time() + 600
    while not ckpt.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert ckpt.is_file(), proc.communicate()[1][-3000:] if proc.poll() is not None else "no checkpoint in time"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "rl" / "done.json").is_file() and (out / "traces" / "done.json").is_file()
    assert not (out / "cold_start" / "done.json").exists()

    second = rlsys("pipeline", str(path))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "rl: done before" in second.stdout and "traces: done before" in second.stdout
    assert "resuming from" in second.stdout  # the SFT stage continued from its checkpoint
    steps = [json.loads(line)["step"] for line in (out / "cold_start" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(len(steps))) and len(steps) >= 3  # every step logged once, none twice
    record = json.loads((out / "cold_start" / "done.json").read_text())
    assert Path(record["model"]).name == f"step_{len(steps)}" and record["data"].endswith("traces.parquet")
    table = (out / "summary.md").read_text()
    for stage in ("base", "rl", "traces", "cold_start"):
        assert f"| {stage} |" in table
    assert "min (over every run of the pipeline); this run" in table

    third = rlsys("pipeline", str(path))  # everything done: nothing runs again
    assert third.returncode == 0, third.stderr[-3000:]
    assert all(f"{s}: done before" in third.stdout for s in ("rl", "traces", "cold_start"))
    assert "resuming from" not in third.stdout and "run folder" not in third.stdout


def test_sample_keeps_by_its_rules_and_records_provenance(tmp_path):
    out = tmp_path / "traces.parquet"
    # One short example without the R1-Zero text template: the tiny model's character tokenizer
    # would make the templated example and question longer than its 512 positions.
    shots = tmp_path / "shots.jsonl"
    shots.write_text(json.dumps({"prompt": "2+2?", "response": "<think>2+2</think><answer>4</answer>"}) + "\n")
    proc = rlsys("sample", "configs/tiny.yaml", "--model", "tiny", "--dataset", "configs/data/toy_digits.jsonl",
                 "--limit", "6", "--k", "3", "--keep", "all", "--max-per-prompt", "2", "--out", str(out),
                 "--few-shot", str(shots), "data.template=none", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    prov = json.loads(pq.read_schema(out).metadata[b"rlsys"])
    counts = prov["counts"]
    rows = pq.read_table(out).to_pylist()
    assert counts["candidates"] == 18 and counts["kept"] == len(rows) <= 12
    assert counts["kept"] + sum(v for k, v in counts.items() if k in ("duplicate", "near_duplicate", "over_cap")) == 18
    assert prov["k"] == 3 and prov["sampling"]["max_tokens"] == 16 and prov["filters"]["keep"] == "all"
    assert all(sum(r["prompt_index"] == i for r in rows) <= 2 for i in range(6))
    # the sampler saw the worked examples; the dataset pairs the bare question with the answer
    assert prov["sampling"]["few_shot"] == {"file": str(shots), "examples": [["2+2?", "<think>2+2</think><answer>4</answer>"]]}
    questions = [json.loads(line)["prompt"] for line in (REPO / "configs/data/toy_digits.jsonl").read_text().splitlines()]
    assert all(r["prompt"] == questions[r["prompt_index"]] for r in rows)
    # the tiny random model never answers right: keep=correct keeps nothing, every sample counted as dropped
    strict = rlsys("sample", "configs/tiny.yaml", "--model", "tiny", "--dataset", "configs/data/toy_digits.jsonl",
                   "--limit", "2", "--k", "2", "--out", str(tmp_path / "none.parquet"), *SMALL)
    assert strict.returncode == 0, strict.stderr[-3000:]
    assert "kept 0 of 4 samples" in strict.stdout


@pytest.mark.parametrize("stages, message", [
    ("  - {name: a, kind: bake}", "kind must be one of"),
    ("  - {name: a, kind: sft, data: nowhere}", "data='nowhere' is neither"),
    ("  - {name: a, kind: train, model: later}\n  - {name: later, kind: train}", "model='later' is neither"),
    ("  - {name: a, kind: train}\n  - {name: a, kind: train}", "the name is taken"),
    ("  - {name: a, kind: train, colour: red}", "colour"),
    ("  - {name: a, kind: train, model: student}", "names no student"),
    ("  - {name: a, kind: train, overrides: [learner.mini_batch_size=3]}", r"stages\[0\] \(a\): .*mini_batch_size"),
    ("  - {name: a, kind: sample, near_duplicate: 2}", "near-duplicate"),
    ("  - {name: a, kind: sample, few_shot: nowhere.jsonl}", r"stages\[0\] \(a\): few-shot file nowhere.jsonl: file not found"),
    ("  - {name: a, kind: sample, overrides: ['generator.tools=[calculator]']}",
     r"stages\[0\] \(a\): generator.tools=\['calculator'\]: rejection sampling with tools is not supported"),
])
def test_bad_pipeline_files_stop_with_the_stage_named(tmp_path, stages, message):
    with pytest.raises(ConfigError, match=message):
        load_pipeline(write_pipeline(tmp_path, stages))


def weights(folder) -> dict:
    """An HF folder's tensors, by name, from its safetensors files."""
    from safetensors.torch import load_file

    return {k: v for f in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(f).items()}


def test_distill_samples_the_teacher_and_fine_tunes_the_student(tmp_path):
    # The plumbing, on the tiny model as both teacher and student: the tiny teacher is never
    # right, so its samples are kept whatever they say (distill.keep=all).
    config = tmp_path / "distill.yaml"
    config.write_text((REPO / "configs" / "tiny.yaml").read_text() + f"""
distill:
  teacher: tiny
  student: tiny
  dataset: {REPO / "configs" / "data" / "toy_digits.jsonl"}
  limit: 8
  k: 2
  keep: all
eval: {{dataset: digit_add, split: test, limit: 4, k: 2}}
""")
    out = tmp_path / "distill"
    proc = rlsys("distill", str(config), f"trainer.output_dir={out}", "learner.mini_batch_size=4", "sft.epochs=2",
                 *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (out / "summary.md").read_text()
    for stage in ("base", "student", "teacher_samples", "student_sft"):
        assert f"| {stage} |" in table, table
    record = json.loads((out / "student_sft" / "done.json").read_text())
    assert record["data"].endswith("teacher_samples/traces.parquet") and Path(record["model"]).is_dir()
    assert json.loads(pq.read_schema(record["data"]).metadata[b"rlsys"])["k"] == 2
    # The student was fine-tuned: its weights are not the tiny model's it started from.
    cfg = load_config(config, ["learner.mini_batch_size=4", *SMALL])
    before = weights(resolve_model(dataclasses.replace(cfg.model, path="tiny")))
    after = weights(record["model"])
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, f"SFT changed only {changed} of {sorted(before)}"


def test_the_shipped_pipeline_file_loads():
    # Every stage's rlsys config and few-shot file are checked at load: a broken override in
    # configs/r1_pipeline.yaml would otherwise stop the pipeline after the stages before it ran.
    cfg = load_pipeline(REPO / "configs" / "r1_pipeline.yaml")
    kinds = {s.name: s.kind for s in cfg.stages}
    assert kinds["cold_start_traces"] == "sample" and kinds["cold_start"] == "sft" and kinds["final_rl"] == "train"
    assert [s.few_shot for s in cfg.stages if s.few_shot] == ["configs/data/r1_few_shot.jsonl"] * 2
