"""Supervised fine-tuning: the loss covers response tokens only, the learner's SFT step reports the
NLL the model gives, and `rlsys sft` trains, checkpoints and resumes like `rlsys train`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlsys.math.sft import sft_batch, sft_loss

REPO = Path(__file__).resolve().parent.parent


def test_doctests():
    import doctest

    from rlsys.loops import sft as loop
    from rlsys.math import sft

    assert doctest.testmod(sft).failed == 0 and doctest.testmod(loop).failed == 0


def test_the_loss_masks_the_prompt():
    # Two examples: prompt 3 + response 2 and prompt 1 + response 1 (padded to 5). The loss is the
    # response tokens' summed NLL over the normaliser: d loss / d logp is -1/3 on each of the 3
    # response tokens and exactly 0 on prompt and padding positions.
    batch = sft_batch([([5, 6, 7], [8, 9]), ([5], [4])])
    logp = torch.log(torch.rand(2, 5, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    loss, metrics = sft_loss(logp, batch.loss_mask, normalizer=float(batch.loss_mask.sum()))
    loss.backward()
    expected = torch.tensor([[0, 0, 0, -1 / 3, -1 / 3], [0, -1 / 3, 0, 0, 0]])
    assert torch.allclose(logp.grad, expected)
    picked = logp.detach()[batch.loss_mask.bool()]
    assert metrics["nll_sum"] == pytest.approx(float(-picked.sum()))
    assert float(loss.detach()) == pytest.approx(float(-picked.mean()))


def test_learner_sft_step_reports_the_models_nll_and_lowers_it():
    from rlsys.actors.learner import Learner
    from rlsys.actors.weight_sync import free_port
    from rlsys.config import AlgoConfig, LearnerConfig, ModelConfig
    from rlsys.data.models import resolve_model

    g = torch.Generator().manual_seed(0)
    examples = [(torch.randint(5, 100, (p,), generator=g).tolist(), torch.randint(5, 100, (r,), generator=g).tolist())
                for p, r in ((4, 3), (2, 6), (5, 1), (3, 4))]
    batch = sft_batch(examples)
    cfg = LearnerConfig(num_ranks=1, mini_batch_size=4, max_tokens_per_micro_batch=12, lr=1e-2, share_prompts=False)
    learner = Learner(resolve_model(ModelConfig()), "float32", cfg, AlgoConfig(group_size=2, beta=0.0), 1.0,
                      rank=0, world=1, backend="gloo", seed=0)
    learner.setup("127.0.0.1", free_port())
    with torch.no_grad():  # the NLL by hand: the model's log-softmax at each response token, averaged
        logits = learner.engine.module(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
        nll = float(-(logp * batch.loss_mask[:, 1:]).sum() / batch.loss_mask.sum())
    assert len(learner.shard(batch, grpo=False).minis[0]) > 1  # the budget cuts the batch: accumulation is exercised
    first = learner.train_sft(batch)
    assert first["nll"] == pytest.approx(nll, rel=1e-5)
    assert first["loss"] == pytest.approx(nll, rel=1e-5) and first["grad_norm"] > 0
    later = [learner.train_sft(batch)["nll"] for _ in range(15)]
    assert later[-1] < 0.5 * nll


def rlsys(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("rlsys")
    return subprocess.run([str(exe), *args], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_rlsys_sft_trains_checkpoints_and_resumes(tmp_path):
    data = tmp_path / "traces.jsonl"
    with data.open("w") as f:
        for i in range(10):  # 10 examples, 4 a step: 2 steps an epoch (2 examples wait for the next shuffle)
            f.write(json.dumps({"prompt": f"What is {i} + 1?", "response": f"<think> {i} + 1 </think> <answer> {i + 1} "
                                                                          f"</answer>"}) + "\n")
    out = tmp_path / "run"
    common = ["configs/tiny.yaml", f"data.path={data}", "learner.mini_batch_size=4", "learner.micro_batch_size=2",
              "learner.lr=3e-3",
              f"trainer.output_dir={out}", "trainer.save_every=2", "trainer.progress=false"]
    first = rlsys("sft", *common, "sft.epochs=2")
    assert first.returncode == 0, first.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert {"loss", "nll", "grad_norm", "lr", "tokens/total", "throughput/tokens_per_s"} <= set(rows[0])
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_2", "step_4"]
    state = json.loads((out / "checkpoints" / "step_4" / "trainer_state.json").read_text())
    assert state["kind"] == "sft" and state["step"] == 4

    again = rlsys("sft", *common, "sft.epochs=3", "trainer.resume=auto")  # one more epoch, from step 4
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout and "step_4" in again.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert rows[-1]["nll"] < rows[0]["nll"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step_6")  # the next stage's model.path


def test_rlsys_sft_to_a_storage_uri_uploads_the_run(tmp_path):
    """trainer.output_dir=file://...: staged on the driver and copied there after every step, as
    `rlsys train` does: the metrics and the whole checkpoint reach the URI."""
    data = tmp_path / "traces.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}?", "response": f"<answer> {i} </answer>"}) + "\n"
                            for i in range(4)))
    target = tmp_path / "bucket" / "run"
    proc = rlsys("sft", "configs/tiny.yaml", f"data.path={data}", "learner.mini_batch_size=2",
                 "learner.micro_batch_size=2", "learner.num_ranks=1", f"trainer.output_dir=file://{target}",
                 "trainer.progress=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [json.loads(line)["step"] for line in (target / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    from rlsys.checkpoint import damage

    assert damage(target / "checkpoints" / "step_2") == []  # every file there, matching its checksum
    assert (target / "checkpoints" / "latest").read_text().strip() == "step_2"


def test_sft_bad_input_stops_with_the_row_and_the_key(tmp_path):
    data = tmp_path / "traces.jsonl"
    data.write_text(json.dumps({"prompt": "q", "response": "r"}) + "\n" + json.dumps({"prompt": "q2"}) + "\n")
    proc = rlsys("sft", "configs/tiny.yaml", f"data.path={data}", f"trainer.output_dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "row 1" in proc.stderr and "'response'" in proc.stderr, proc.stderr[-2000:]
    proc = rlsys("sft", "configs/tiny.yaml", "data.name=gsm8k", f"trainer.output_dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "data.name=gsm8k" in proc.stderr and "rlsys sample" in proc.stderr


def test_a_learner_group_alone_is_placed_as_cluster_placement_says(capsys):
    """rlsys sft (and the pipeline's SFT stages) start learners only: disaggregated keeps them on
    the nodes that declare cluster.learner_resource; colocated (generator i beside learner rank i)
    means nothing without generators, so they are placed as with `any`, and the run says so."""
    from rlsys.cluster.learners import learners_alone
    from rlsys.cluster.placement import MARKER, layout
    from rlsys.config import load_config

    cfg = load_config(None, ["cluster.placement=disaggregated", "cluster.learner_resource=trainers",
                             "learner.num_ranks=2"])
    bundles, _ = layout(learners_alone(cfg), gpu=False).groups["rlsys-learners"]
    assert bundles == [{"CPU": cfg.learner.num_cpus, "trainers": MARKER}] * 2
    assert capsys.readouterr().out == ""
    cfg = load_config(None, ["cluster.placement=colocated", "learner.num_ranks=2", "generator.num_engines=2"])
    lay = layout(learners_alone(cfg), gpu=False)
    assert lay.groups["rlsys-learners"][0] == [{"CPU": cfg.learner.num_cpus}] * 2  # no generator CPUs asked
    assert "placed as with cluster.placement=any" in capsys.readouterr().out
