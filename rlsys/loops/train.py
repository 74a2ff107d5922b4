"""THE LOOP: synchronous GRPO, R1-Zero style (no SFT, rule rewards only).

Each step: the generators sample `group_size` answers per question with the current weights,
the reward workers score them, the learner group takes one GRPO update, and learner rank 0
broadcasts the new weights to every generator. Synchronous: every rollout of a step must carry
the weight version the learner last pushed; the loop checks it, it does not assume it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from tqdm import tqdm

from rlsys.data import datasets
from rlsys.math.batch import make_batch
from rlsys.config import Config, ConfigError, to_yaml
from rlsys.data.prompts import PromptStream, check_prompt_lengths, resolve_data_path
from rlsys.loops.evaluate import Problem, load_problems, require_usable_golds, run_eval
from rlsys.cluster.capacity import check_fits, model_params
from rlsys.cluster.groups import Groups, in_ray_job, init_ray, launch
from rlsys.cluster.storage import RunStorage, is_uri
from rlsys.checkpoint import commit, find_resumable, read_trainer_state, write_trainer_state
from rlsys.cluster.deadlines import ActorLost, PhaseTimeout, dump_stacks
from rlsys.loops.resume import check_same_run, cut_logs, driver_state, restore_driver, resume_point
from rlsys.observe.metrics import RunLog, Timer, rollout_stats, sparkline
from rlsys.data.models import default_cache_dir, resolve_model
from rlsys.observe.profile import Timeline


def train(cfg: Config) -> Path:
    run_dir = resolve_run_dir(cfg.trainer.output_dir)
    storage = RunStorage(cfg.trainer.output_dir, run_dir) if is_uri(cfg.trainer.output_dir) else None
    if storage is not None and cfg.trainer.resume == "auto":
        raise ConfigError(f"trainer.resume=auto reads the run folder, and trainer.output_dir={cfg.trainer.output_dir} "
                          f"is a storage URI: copy the run's checkpoint folder to local disk and give it as "
                          f"trainer.resume=PATH (the run continues into a new trainer.output_dir)")
    if storage is not None and storage.holds_run():  # never mix two runs' metrics, never overwrite one
        raise FileExistsError(f"trainer.output_dir={cfg.trainer.output_dir} already holds a run (metrics.jsonl); "
                              f"choose another trainer.output_dir")
    resume_from = resume_point(cfg, run_dir)
    resumed = read_trainer_state(resume_from) if resume_from is not None else None
    if resumed is not None:
        check_same_run(resumed["config"], cfg)
    model_path, tokenizer, prompts, eval_problems, verifier = preflight(cfg, run_dir, resume_from)
    start, version = restore_driver(resumed, prompts) if resumed is not None else (0, 0)
    if start >= cfg.trainer.total_steps:
        print(f"[rlsys] {resume_from} is at step {start}: trainer.total_steps={cfg.trainer.total_steps} are done; "
              f"nothing to train (raise trainer.total_steps to go on)", flush=True)
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"[rlsys] run folder: {run_dir}" + (f" (staged here, copied to {cfg.trainer.output_dir} after every step)"
                                              if storage is not None else ""), flush=True)
    if resumed is not None:  # before any actor starts: a malformed log stops the resume here
        print(f"[rlsys] resuming from {resume_from}: step {start}, weight version {version}; "
              f"{cut_logs(run_dir, start)} log line(s) of steps >= {start} dropped (they run again)", flush=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    init_ray(cfg)
    groups = launch(cfg, model_path, verifier)
    (run_dir / "placement.json").write_text(json.dumps(groups.placement, indent=2))
    log, timer = RunLog(run_dir, cfg), Timer(trace=cfg.profile.enabled)
    pool_log = open(run_dir / "pool.jsonl", "a")
    curve, generate_share, bad_streak = [], None, 0
    timeline = Timeline() if cfg.profile.enabled else None
    bar = tqdm(range(start, cfg.trainer.total_steps), desc="grpo", initial=start, total=cfg.trainer.total_steps,
               disable=not cfg.trainer.progress, dynamic_ncols=True)
    try:
        if resumed is not None:  # the checkpoint's learner, and its weights on every generator
            trained = groups.learner.load_state(resume_from)
            assert trained == start, f"{resume_from}: the learner has trained {trained} batches, the driver {start}"
            assert groups.sync.push(version) == [version] * len(groups.generators.engines)
        elif cfg.eval.every:  # the untrained weights, for comparison
            evaluate(groups, eval_problems, cfg, run_dir / "evals" / "step_0.json")
        for step in bar:
            batch_prompts = prompts.next()
            with timer.spans.span("step", step=step):
                with timer("pool"):  # engines join (with this version's weights) or leave, between steps
                    pool = groups.generators.between_steps(step, generate_share, len(batch_prompts),
                                                           join=lambda new: groups.sync.catch_up(new, version))
                with timer("generate"):
                    rollouts = groups.generators.generate([p.request(g) for g, p in enumerate(batch_prompts)],
                                                          n=cfg.algo.group_size, seed=(cfg.trainer.seed, step))
                stale = {r.weight_version for r in rollouts} - {version}
                assert not stale, f"step {step}: rollouts from weight versions {stale}, expected only {version}"
                with timer("reward"):
                    scores = groups.rewards.score(rollouts)
                batch = make_batch(rollouts, [s.reward for s in scores], cfg.algo)
                with timer("learn"):
                    learn = groups.learner.train(batch)
                with timer("sync"):
                    versions = groups.sync.push(version + 1)
            assert versions == [version + 1] * len(versions), f"step {step}: generators report versions {versions}"
            version += 1
            check_logprob_gap(step, learn, cfg.trainer.logprob_gap_warn, cfg.trainer.logprob_gap_stop)
            bad_streak = check_bad_steps(step, learn, bad_streak, cfg.learner.max_bad_steps)
            stats = rollout_stats(rollouts, scores, cfg.algo.group_size)
            timings = timer.pop()
            step_s = sum(timings.values())
            generate_share = timings["timing/generate"] / step_s
            tokens = sum(len(r.prompt_ids) + len(r.response_ids) for r in rollouts)
            metrics = {"weight_version": version, "rollouts/count": len(rollouts),
                       "data/skipped_rows": len(prompts.skipped), **stats, **learn, **timings,
                       "tokens/total": tokens,
                       "throughput/tokens_per_s": tokens / step_s, **pool_metrics(pool)}
            pool_log.write(json.dumps({"step": step, **pool}) + "\n")
            pool_log.flush()
            if pool["events"]:
                (run_dir / "placement.json").write_text(json.dumps(groups.placement, indent=2))
            last = step + 1 == cfg.trainer.total_steps
            if due(step, cfg.eval.every, last):
                with timer.spans.span("eval"):
                    metrics |= evaluate(groups, eval_problems, cfg, run_dir / "evals" / f"step_{version}.json")
            sample = {"prompt": batch_prompts[0].text, "completion": rollouts[0].text, "answer": rollouts[0].answer,
                      "reward": scores[0].reward}
            log.log(step, metrics, sample)  # before the save: a checkpoint never holds a step the log lacks
            if due(step, cfg.trainer.save_every, last) or last:
                with timer.spans.span("save"):
                    save(groups, run_dir, version, prompts, cfg)
            if storage is not None:
                storage.upload()
            if timeline is not None:
                collect(timeline, groups, timer)
            curve.append(stats["reward/mean"])
            bar.set_postfix(reward=f"{stats['reward/mean']:.3f}", acc=f"{stats['reward/accuracy']:.2f}",
                            fmt=f"{stats['reward/format']:.2f}", kl=f"{learn.get('kl', 0):.4f}",
                            curve=sparkline(curve[-30:]))
    except PhaseTimeout as e:  # something hangs: show where, then stop
        stacks = dump_stacks(groups.placement, run_dir / "stacks")
        raise RuntimeError(f"{e}. The run stops; every actor's stack is in {stacks}/. "
                           f"{last_checkpoint(run_dir)}") from e
    except ActorLost as e:
        if not e.name.startswith("learner"):
            raise
        raise RuntimeError(f"{e}. A learner rank cannot be replaced within a run (its optimizer shard and its "
                           f"place in the collectives went with it): the run stops. {last_checkpoint(run_dir)}") from e
    finally:
        log.close()
        pool_log.close()
        try:
            if timeline is not None:  # also after a crash: the trace shows where it stopped
                collect(timeline, groups, timer)
                timeline.write(run_dir / "timeline.json")
        finally:
            groups.shutdown()
            if storage is not None:  # also after a crash: what was written is on the storage
                storage.upload()
    return run_dir


def save(groups: Groups, run_dir: Path, version: int, prompts: PromptStream, cfg: Config) -> Path:
    """Checkpoint step_<version>: every learner rank's part, then the driver's; whole or not at all."""
    state = driver_state(version, version, prompts, cfg)

    def write(folder: Path) -> None:
        groups.learner.save(folder)
        write_trainer_state(folder, state)

    return commit(run_dir, version, write, cfg.trainer.keep_last)


def last_checkpoint(run_dir: Path) -> str:
    found = find_resumable(run_dir)
    if found is None:
        return "No checkpoint was written yet (trainer.save_every)."
    return f"Last checkpoint: {found}; continue with trainer.resume=auto."


def check_bad_steps(step: int, learn: dict, streak: int, limit: int) -> int:
    """Count steps in a row whose learner skipped an update (non-finite loss or gradient norm);
    past `limit` the run stops. Returns the new count.

    >>> check_bad_steps(4, {"skipped_updates": 0.0}, streak=2, limit=2)
    0
    >>> check_bad_steps(5, {"skipped_updates": 1.0}, streak=0, limit=2)
    [rlsys] step 5: 1 update(s) skipped (non-finite loss or gradient norm); 1 step(s) in a row
    1
    >>> check_bad_steps(7, {"skipped_updates": 2.0}, streak=2, limit=2)
    Traceback (most recent call last):
    ...
    RuntimeError: step 7: updates skipped for a non-finite loss or gradient norm in 3 steps in a row (steps 5-7), more than learner.max_bad_steps=2: the run diverged or its data is broken
    """
    if not learn["skipped_updates"]:
        return 0
    streak += 1
    if streak > limit:
        raise RuntimeError(f"step {step}: updates skipped for a non-finite loss or gradient norm in {streak} steps in "
                           f"a row (steps {step - streak + 1}-{step}), more than learner.max_bad_steps={limit}: the "
                           f"run diverged or its data is broken")
    print(f"[rlsys] step {step}: {learn['skipped_updates']:g} update(s) skipped (non-finite loss or gradient norm); "
          f"{streak} step(s) in a row", flush=True)
    return streak


def check_logprob_gap(step: int, learn: dict, warn: float, stop: float) -> None:
    """The generators sampled with the weights the learner scores with, or nearly: a large mean
    gap between their log-probs means they did not (a broken sync, another model, a sampler
    setting the learner does not reproduce).

    >>> check_logprob_gap(0, {"gen_logprob_abs_diff": 0.2}, warn=0.1, stop=1.0)
    [rlsys] step 0: generator/learner log-prob gap 0.2 > trainer.logprob_gap_warn=0.1
    >>> check_logprob_gap(3, {"gen_logprob_abs_diff": 1.5}, warn=0.1, stop=1.0)
    Traceback (most recent call last):
    ...
    RuntimeError: step 3: the generators' log-probs differ from the learner's by 1.5 per token on average (trainer.logprob_gap_stop=1): they are not sampling with the learner's weights
    """
    gap = learn["gen_logprob_abs_diff"]
    if gap > stop:
        raise RuntimeError(f"step {step}: the generators' log-probs differ from the learner's by {gap:.3g} per token "
                           f"on average (trainer.logprob_gap_stop={stop:g}): they are not sampling with the "
                           f"learner's weights")
    if gap > warn:
        print(f"[rlsys] step {step}: generator/learner log-prob gap {gap:.3g} > trainer.logprob_gap_warn={warn:g}",
              flush=True)


def pool_metrics(pool: dict) -> dict[str, float]:
    """The rollout pool in numbers for metrics.jsonl; pool.jsonl has the engines' nodes and every event."""
    events = pool["events"]
    joins = [e["seconds_to_serving"] for e in events if e["event"] == "join"]
    return {"pool/size": len(pool["engines"]), "pool/starting": len(pool["starting"]), "pool/joined": len(joins),
            "pool/left": sum(e["event"] in ("lost", "drained", "shrink") for e in events),
            "pool/join_seconds": max(joins, default=0.0)}


def collect(timeline: Timeline, groups: Groups, timer: Timer) -> None:
    timeline.add("driver", timer.spans.take())
    for track, spans in groups.tracks().items():
        timeline.add(track, spans)


def resolve_run_dir(output_dir: str) -> Path:
    """The run folder as an absolute path, fixed once on the driver before Ray starts: connecting
    to a cluster may change the driver's working directory, and every actor has its own.

    A relative path resolves against $RLSYS_BASE_DIR when set (cluster/submit.sh sets it to the
    folder the job was submitted from), else against the working directory, except in a submitted
    Ray job, whose working directory is Ray's temporary copy of the job's files (deleted by Ray
    later): there a relative path is refused. A storage URI (s3://, gs://, file://...) gets a fresh
    staging folder on the driver's disk, copied to the URI after every step (rlsys.cluster.storage)."""
    if is_uri(output_dir):  # staged on the driver's disk, copied to the URI as the run goes
        staging = default_cache_dir() / "staging"
        staging.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="run-", dir=staging))
    path = Path(output_dir).expanduser()
    if path.is_absolute():
        return path
    if os.environ.get("RLSYS_BASE_DIR"):
        return Path(os.environ["RLSYS_BASE_DIR"]) / path
    if in_ray_job():
        raise ConfigError(
            f"trainer.output_dir={output_dir} is relative, and this driver runs as a Ray job inside Ray's temporary "
            f"copy of the job's working dir ({Path.cwd()}), which Ray deletes: the run would be lost. Give an "
            f"absolute trainer.output_dir on storage you can reach, or a storage URI (s3://..., gs://...), or submit "
            f"with `rlsys submit --base-dir DIR` / cluster/submit.sh (a relative path then resolves against DIR, the "
            f"folder you submit from)")
    return Path.cwd() / path


def preflight(cfg: Config, run_dir: Path, resume_from: Path | None = None):
    """Everything that can be wrong with the inputs, found before any actor starts."""
    from transformers import AutoTokenizer

    holds_run = (run_dir / "metrics.jsonl").exists()
    if holds_run and resume_from is None:  # never mix two runs' metrics, never overwrite one
        raise FileExistsError(f"trainer.output_dir={run_dir} already holds a run (metrics.jsonl); "
                              f"continue it with trainer.resume=auto, or choose another trainer.output_dir")
    if holds_run and resume_from.parent.parent.resolve() != run_dir.resolve():
        raise FileExistsError(f"trainer.resume={resume_from} continues into trainer.output_dir={run_dir}, which holds "
                              f"another run (metrics.jsonl): choose a new trainer.output_dir")
    model_path = resolve_model(cfg.model)
    if not cfg.cluster.address and not in_ray_job():  # a local cluster: the run must fit this machine
        import psutil

        check_fits(cfg, model_params(model_path), psutil.virtual_memory().available)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = PromptStream(cfg.data, seed=cfg.trainer.seed, tokenizer=tokenizer)
    source = (f"training data data.name={cfg.data.name} (split {cfg.data.split})" if cfg.data.name
              else f"training data {resolve_data_path(cfg.data.path)}")
    over = check_prompt_lengths(prompts.ids, cfg.generator.max_model_len - cfg.generator.max_tokens, source,
                                skip=cfg.data.on_bad_row == "skip")
    if over:
        prompts.drop(set(over), list(over.values()))
    if prompts.skipped:
        print(f"[rlsys] data.on_bad_row=skip: left out {len(prompts.skipped)} bad row(s) of {source}, "
              f"{len(prompts.rows)} remain: " + "; ".join(prompts.skipped[:5])
              + (" ..." if len(prompts.skipped) > 5 else ""), flush=True)
    verifier = datasets.resolve_verifier(cfg.reward.verifier, cfg.data.name, cfg.data.path)
    require_usable_golds([answer for _, answer in prompts.rows], verifier, source)
    if cfg.eval.every and datasets.verifier_for(cfg.eval.dataset) != verifier:
        raise ConfigError(f"eval.dataset={cfg.eval.dataset} is judged by {datasets.verifier_for(cfg.eval.dataset)}, "
                          f"training data by {verifier}: the reward workers serve one verifier per run")
    eval_problems = load_problems(cfg.eval, cfg.data, cfg.generator, tokenizer) if cfg.eval.every else []
    return model_path, tokenizer, prompts, eval_problems, verifier


def due(step: int, every: int, last: bool) -> bool:
    """Periodic work after step `step` (0-based): every `every` steps and after the last; never if 0."""
    return every > 0 and ((step + 1) % every == 0 or last)


def evaluate(groups: Groups, problems: list[Problem], cfg: Config, out: Path) -> dict:
    """Held-out evaluation with the weights the generators now serve; the summary goes to the step's metrics."""
    from rlsys.loops.evaluate import write

    summary = run_eval(groups, problems, cfg.eval, cfg.data, cfg.reward.require_answer_tag,
                       cfg.generator.max_tokens)
    write(summary, out)
    return {f"eval/{k}": v for k, v in summary.items() if isinstance(v, float) and k != "temperature"
            and k != "top_p"}
