"""`rlsys pipeline`: DeepSeek-R1's stages chained, each stage's output the next one's input.

R1.md's recipe: (1) cold-start SFT on long chains of thought, (2) reasoning RL as R1-Zero plus the
language-consistency reward, (3) rejection sampling from that checkpoint, then SFT from the base
on what was kept, (4) a final RL stage; and distillation of the kept traces into a smaller model.
A pipeline file (configs/r1_pipeline.yaml) lists the stages; each is one of the commands:
- sample: `rlsys sample` (rlsys.loops.sample) -> <stage>/traces.parquet
- sft:    `rlsys sft` (rlsys.loops.sft) on a sample stage's traces (or a file) -> a model
- train:  `rlsys train` (GRPO) -> a model
A stage's `model` is "base", "student", an earlier stage's name (its model; a sample stage
names the model it sampled), or a path. Every stage writes into <output_dir>/<stage>/; when it is
done, <stage>/done.json records its outputs and evaluation. A re-run skips the stages that are
done; a stage killed halfway continues from its last checkpoint (train, sft: trainer.resume=auto;
sample: the rounds already sampled, <stage>/candidates.jsonl). Each model is evaluated the R1
way (rlsys.loops.evaluate, the pipeline's `eval` settings), the base and the student before any
stage, and one table of every evaluation closes the run (<output_dir>/summary.md); eval.enabled=false
evaluates nothing. The pipeline runs as one driver: every stage's model is a folder on its node (the
learners' checkpoints reach it without shared storage), and each stage's actors get it streamed
from there once per node (rlsys.data.models.ModelSource).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rlsys.config import Config, ConfigError, load_config
from rlsys.data.prompts import DataError, load_shots
from rlsys.data.traces import Filters
from rlsys.loops.sample import check_sampling

KINDS = ("sample", "sft", "train")


@dataclass
class StageConfig:
    name: str
    kind: str
    """sample | sft | train."""
    model: str = "base"
    """base | student | an earlier stage's name | a path: the model this stage starts from (samples with)."""
    data: str | None = None
    """sft: an earlier sample stage's name, or a .jsonl/.parquet of (prompt, response) pairs."""
    dataset: str = "gsm8k"
    split: str = "train"
    limit: int | None = None
    """sample: the questions (a registry dataset or a file), the first `limit` of them."""
    k: int = 8
    keep: str = "correct"
    language: str | None = None
    min_language: float = 0.95
    near_duplicate: float = 0.8
    max_per_prompt: int = 4
    """sample: rlsys.data.traces.Filters."""
    few_shot: str | None = None
    """sample: a .jsonl of worked examples shown before each question (rlsys.data.prompts.load_shots)."""
    overrides: list[str] = field(default_factory=list)
    """key=value for this stage's rlsys config (after the pipeline's own overrides)."""

    def filters(self) -> Filters:
        return Filters(self.keep, self.language, self.min_language, self.near_duplicate, self.max_per_prompt)


@dataclass
class PipelineEval:
    dataset: str = "gsm8k"
    split: str = "test"
    limit: int = 50
    k: int = 4
    enabled: bool = True
    """False: no model is evaluated (the summary lists the stages alone): a pipeline run for its models
    only, and tests that check the stages chain."""


@dataclass
class PipelineConfig:
    config: str = "rlsys/default.yaml"
    """The rlsys config every stage starts from."""
    overrides: list[str] = field(default_factory=list)
    """key=value for every stage."""
    output_dir: str = "runs/r1_pipeline"
    base: str = "smollm2-135m-instruct"
    student: str | None = None
    """The model distillation fine-tunes (None: no student)."""
    eval: PipelineEval = field(default_factory=PipelineEval)
    stages: list[StageConfig] = field(default_factory=list)


def load_pipeline(path: str | Path, overrides: list[str] = ()) -> PipelineConfig:
    """The pipeline file, checked: unknown keys, unknown kinds, references to stages that do not
    come earlier, duplicate names, all stop here with the stage named."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pipeline file not found: {path}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(PipelineConfig), OmegaConf.load(path),
                                 OmegaConf.from_dotlist(list(overrides)))
        cfg: PipelineConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {e}") from None
    seen: dict[str, str] = {}
    for i, s in enumerate(cfg.stages):
        where = f"{path}: stages[{i}] ({s.name})"
        if s.name in seen or s.name in ("base", "student"):
            raise ConfigError(f"{where}: the name is taken (stage names are unique, and not base or student)")
        if s.kind not in KINDS:
            raise ConfigError(f"{where}: kind must be one of {KINDS}, got {s.kind!r}")
        if s.model not in ("base", "student") and s.model not in seen and not Path(s.model).exists():
            raise ConfigError(f"{where}: model={s.model!r} is neither base, student, an earlier stage nor a path")
        if s.model == "student" and cfg.student is None:
            raise ConfigError(f"{where}: model=student, and the pipeline names no student")
        if s.kind == "sft":
            if s.data is None:
                raise ConfigError(f"{where}: an sft stage needs data (a sample stage's name or a file)")
            if seen.get(s.data, "sample") != "sample" or (s.data not in seen and not Path(s.data).is_file()):
                raise ConfigError(f"{where}: data={s.data!r} is neither an earlier sample stage nor a file")
        if s.kind == "sample":
            try:
                s.filters().check()
                if s.few_shot:
                    load_shots(s.few_shot)
            except (ConfigError, DataError) as e:
                raise ConfigError(f"{where}: {e}") from None
        try:  # the stage's rlsys config, checked now rather than after the stages before it have run
            stage_cfg = load_config(cfg.config, [*cfg.overrides, *s.overrides])
            if s.kind == "sample":
                check_sampling(stage_cfg)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        seen[s.name] = s.kind
    return cfg


class Pipeline:
    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.root = Path(cfg.output_dir).resolve()
        self.models: dict[str, str] = {}
        """stage name (and base, student) -> the model it produced (or sampled with)."""
        self.traces: dict[str, str] = {}
        self.rows: list[dict] = []
        """One per evaluation: the summary table."""

    def rlsys_config(self, stage: StageConfig | None, extra: list[str]) -> Config:
        return load_config(self.cfg.config, [*self.cfg.overrides, *(stage.overrides if stage else []), *extra])

    def run(self) -> Path:
        from rlsys.data.models import resolve_model

        self.root.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        base_cfg = self.rlsys_config(None, [])
        self.models["base"] = resolve_model(dataclasses.replace(base_cfg.model, path=self.cfg.base))
        if self.cfg.student:
            self.models["student"] = resolve_model(dataclasses.replace(base_cfg.model, path=self.cfg.student))
        starts = ("base", "student") if self.cfg.student else ("base",)
        for name in starts if self.cfg.eval.enabled else ():
            done = self.root / f"{name}_eval.json"  # evaluated once, like a stage
            if done.is_file():
                self.rows.append(json.loads(done.read_text()))
                continue
            self.rows.append(self.evaluated(name, name, self.models[name], base_cfg))
            done.write_text(json.dumps(self.rows[-1], indent=1))
        for stage in self.cfg.stages:
            self.stage(stage)
        table = summary_table(self.rows, time.time() - t0)
        (self.root / "summary.md").write_text(table + "\n")
        print(table, flush=True)
        return self.root

    def stage(self, s: StageConfig) -> None:
        folder = self.root / s.name
        done = folder / "done.json"
        if done.is_file():
            record = json.loads(done.read_text())
            print(f"[pipeline] {s.name}: done before ({done}), skipped", flush=True)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            print(f"[pipeline] {s.name}: {s.kind} from {s.model}", flush=True)
            t0 = time.time()
            record = getattr(self, f"run_{s.kind}")(s, folder)
            record["seconds"] = round(time.time() - t0, 1)
            if "model" in record and s.kind != "sample" and self.cfg.eval.enabled:
                record["eval"] = self.evaluated(s.name, s.kind, record["model"], self.rlsys_config(s, []))
                record["eval"]["stage_s"] = record["seconds"]
            done.write_text(json.dumps(record, indent=1))
        self.models[s.name] = record["model"]
        if "traces" in record:
            self.traces[s.name] = record["traces"]
        if "eval" in record:
            self.rows.append(record["eval"])
        elif s.kind == "sample":
            self.rows.append({"stage": s.name, "kind": "sample", "model": Path(record["model"]).name,
                              "kept": record["counts"]["kept"], "candidates": record["counts"]["candidates"],
                              "stage_s": record["seconds"]})
        else:  # eval.enabled=false
            self.rows.append({"stage": s.name, "kind": s.kind, "model": Path(record["model"]).name,
                              "stage_s": record["seconds"]})

    def run_sample(self, s: StageConfig, folder: Path) -> dict:
        from rlsys.loops.sample import sample

        model = self.models[s.model] if s.model in self.models else s.model
        out = folder / "traces.parquet"
        cfg = self.rlsys_config(s, [])
        _, prov = sample(cfg, model, s.dataset, s.k, out, s.filters(), s.split, s.limit,
                         resume_file=folder / "candidates.jsonl", few_shot=s.few_shot)
        return {"model": model, "traces": str(out), "counts": prov["counts"]}

    def _fine_tune_args(self, s: StageConfig, folder: Path) -> list[str]:
        from rlsys.checkpoint import find_resumable

        run = folder / "run"
        args = [f"model.path={self.models[s.model] if s.model in self.models else s.model}",
                f"trainer.output_dir={run}"]
        if run.is_dir() and find_resumable(run) is not None:  # killed halfway: continue
            args.append("trainer.resume=auto")
        return args

    def run_sft(self, s: StageConfig, folder: Path) -> dict:
        from rlsys.checkpoint import find_checkpoint
        from rlsys.loops.sft import sft

        data = self.traces.get(s.data, s.data)
        run = sft(self.rlsys_config(s, [*self._fine_tune_args(s, folder), f"data.path={data}", "data.name=null",
                                        "data.prompt_field=prompt"]))
        return {"model": str(find_checkpoint(run)), "data": data}

    def run_train(self, s: StageConfig, folder: Path) -> dict:
        from rlsys.checkpoint import find_checkpoint
        from rlsys.loops.train import train

        run = train(self.rlsys_config(s, [*self._fine_tune_args(s, folder), "eval.every=0"]))
        return {"model": str(find_checkpoint(run))}

    def evaluated(self, stage: str, kind: str, model: str, cfg: Config) -> dict:
        """The R1 evaluation of `model` (the pipeline's eval settings) as a summary-table row."""
        from rlsys.loops.evaluate import evaluate_model

        e = self.cfg.eval
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, dataset=e.dataset, split=e.split,
                                                                 limit=e.limit, k=e.k))
        summary = evaluate_model(cfg, model)
        return {"stage": stage, "kind": kind, "model": Path(model).name, "pass@1": summary["pass@1"],
                f"cons@{e.k}": summary[f"cons@{e.k}"], "format": summary["format"],
                "format/full": summary["format/full"], "response_length": summary["response_length/mean"],
                "eval_s": round(summary["seconds"], 1)}


def summary_table(rows: list[dict], seconds: float) -> str:
    """Markdown: one row per evaluation (and per sample stage), in pipeline order."""
    cons = next((k for r in rows for k in r if k.startswith("cons@")), "cons@k")
    lines = [f"| stage | kind | model | minutes | pass@1 | {cons} | full format | format score | response tokens |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        minutes = f"{r['stage_s'] / 60:.1f}" if "stage_s" in r else ""
        if r["kind"] == "sample":
            lines.append(f"| {r['stage']} | sample | {r['model']} | {minutes} | kept {r['kept']} of "
                         f"{r['candidates']} samples | | | | |")
            continue
        if "pass@1" not in r:
            lines.append(f"| {r['stage']} | {r['kind']} | {r['model']} | {minutes} | not evaluated | | | | |")
            continue
        lines.append(f"| {r['stage']} | {r['kind']} | {r['model']} | {minutes} | {r['pass@1']:.3f} | {r[cons]:.3f} | "
                     f"{r['format/full']:.3f} | {r['format']:.3f} | {r['response_length']:.1f} |")
    stages = sum(r.get("stage_s", 0.0) for r in rows) / 60
    evals = sum(r.get("eval_s", 0.0) for r in rows) / 60
    lines.append(f"\nstages {stages:.1f} min + evaluations {evals:.1f} min (over every run of the pipeline); "
                 f"this run {seconds / 60:.1f} min")
    return "\n".join(lines)


def pipeline_command(path: str, overrides: list[str]) -> int:
    Pipeline(load_pipeline(path, overrides)).run()
    return 0


def distill_pipeline(config: str, overrides: list[str]) -> PipelineConfig:
    """`rlsys distill CONFIG`: the config's distill section as a two-stage pipeline: the teacher's
    samples (rejection sampling; or distill.traces, a given trace file), then SFT of the student
    on them; the teacher and the student are evaluated before, the student after (eval.*)."""
    cfg = load_config(config, overrides)
    d = cfg.distill
    if not d.teacher or not d.student:
        raise ConfigError("rlsys distill needs distill.teacher and distill.student (a named model, an HF folder "
                          "or a run folder)")
    stages = []
    if d.traces is None:
        stages.append(StageConfig(name="teacher_samples", kind="sample", model="base", dataset=d.dataset,
                                  split=d.split, limit=d.limit, k=d.k, keep=d.keep, max_per_prompt=d.max_per_prompt))
    stages.append(StageConfig(name="student_sft", kind="sft", model="student", data=d.traces or "teacher_samples"))
    return PipelineConfig(config=config, overrides=list(overrides), output_dir=cfg.trainer.output_dir,
                          base=d.teacher, student=d.student,
                          eval=PipelineEval(cfg.eval.dataset, cfg.eval.split, cfg.eval.limit, cfg.eval.k),
                          stages=stages)


def distill_command(config: str, overrides: list[str]) -> int:
    Pipeline(distill_pipeline(config, overrides)).run()
    return 0
