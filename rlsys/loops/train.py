"""THE LOOP: synchronous GRPO, R1-Zero style (no SFT, rule rewards only).

Each step: the generators sample `group_size` answers per question with the current weights,
the reward workers score them, the learner group takes one GRPO update, and learner rank 0
broadcasts the new weights to every generator. Synchronous: every rollout of a step must carry
the weight version the learner last pushed; the loop checks it, it does not assume it.
trainer.max_staleness > 0 runs the asynchronous loop instead (rlsys.loops.async_train), with the
same set-up and the same end of a step (Run.record).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import tempfile
from pathlib import Path

import ray
from tqdm import tqdm

from rlsys.data import datasets
from rlsys.math.batch import make_batch
from rlsys.loops.rollouts import Collected, collect
from rlsys.config import Config, ConfigError, to_yaml
from rlsys.data.prompts import PromptStream, check_prompt_lengths, resolve_data_path
from rlsys.loops.evaluate import Problem, load_problems, require_usable_golds, run_eval
from rlsys.cluster.capacity import check_local_run
from rlsys.cluster.groups import Groups, in_ray_job, init_ray, launch
from rlsys.cluster.storage import RunStorage, is_uri, open_run_storage
from rlsys.checkpoint import commit, find_resumable, read_trainer_state, write_trainer_state
from rlsys.cluster.deadlines import ActorLost, PhaseTimeout, dump_stacks, located
from rlsys.loops.resume import check_same_run, cut_logs, driver_state, restore_driver, resume_point
from rlsys.observe.metrics import RunLog, Timer, rollout_stats, sparkline
from rlsys.data.models import default_cache_dir, resolve_model
from rlsys.observe.profile import Timeline
from rlsys.loops.async_train import asynchronous


def train(cfg: Config) -> Path:
    run_dir = resolve_run_dir(cfg.trainer.output_dir)
    storage = open_run_storage(cfg.trainer.output_dir, cfg.trainer.resume, run_dir)  # a URI: staged in run_dir
    resume_from = resume_point(cfg, run_dir, storage)
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
    run = Run(cfg, run_dir, groups, prompts, eval_problems, storage, start)
    loop = asynchronous if cfg.trainer.max_staleness > 0 else synchronous
    previous = signal.signal(signal.SIGTERM, run.request_stop)  # after init_ray, whose own handler exits at once
    try:
        if resumed is not None:  # the checkpoint's learner, and its weights on every generator
            trained = groups.learner.load_state(resume_from, storage=storage)
            assert trained == start, f"{resume_from}: the learner has trained {trained} batches, the driver {start}"
            assert groups.sync.push(version) == [version] * len(groups.generators.engines)
        elif cfg.eval.every:  # the untrained weights, for comparison
            evaluate(groups, eval_problems, cfg, run_dir / "evals" / "step_0.json")
        loop(run, start, version)
    except PhaseTimeout as e:  # something hangs: show where, then stop
        stacks = dump_stacks(groups.placement, run_dir / "stacks")
        raise RuntimeError(f"{e}. The run stops; every actor's stack is in {stacks}/. "
                           f"{last_checkpoint(run_dir)}") from e
    except OSError as e:  # the driver's own writes into the run folder: a full disk, most often
        raise RuntimeError(f"writing the run folder {run_dir} on node {socket.gethostname()} "
                           f"({ray.util.get_node_ip_address()}) failed: {e}. The run stops; a checkpoint being "
                           f"written was removed whole. {last_checkpoint(run_dir)}") from e
    except ActorLost as e:  # one that could not be replaced (other losses are handled where they happen)
        why = (" A learner rank cannot be replaced within a run (its optimizer shard and its place in the "
               "collectives went with it)." if e.name.startswith("learner") else "")
        raise RuntimeError(f"{located(e, groups.placement)}.{why} The run stops. {last_checkpoint(run_dir)}") from e
    finally:
        signal.signal(signal.SIGTERM, previous)
        run.close()
    return run_dir


def synchronous(run: "Run", start: int, version: int) -> None:
    """Every step: generate with the current weights, score, learn, push the new weights."""
    cfg, groups, timer = run.cfg, run.groups, run.timer
    generate_share = None
    for step in run.steps(start):
        batch_prompts = run.prompts.next()
        with timer.spans.span("step", step=step):
            with timer("pool"):  # engines join (with this version's weights) or leave, between steps
                pool = groups.generators.between_steps(step, generate_share, len(batch_prompts),
                                                       join=lambda new: groups.sync.catch_up(new, version))
            groups.learner.offload()  # (again, after a save brought the state back: the engines generate next)
            # timer("generate") and timer("reward") inside, once per sampling round
            got = collect(batch_prompts, run.prompts.next, groups.generators.generate, groups.rewards.score, cfg,
                          step, phase=timer)
            stale = {r.weight_version for r in got.rollouts} - {version}
            assert not stale, f"step {step}: rollouts from weight versions {stale}, expected only {version}"
            batch = make_batch(got.rollouts, got.rewards, cfg.algo)
            with timer("learn"):
                # Colocated on GPUs the two sides take turns: the engines free the GPU (generator.sleep_level)
                # while the learner trains, the learner's optimizer state goes to host memory
                # (learner.offload_states) before the engines wake for the push and generate.
                groups.generators.sleep()
                learn = groups.learner.train(batch)
                groups.learner.offload()
            with timer("sync"):
                versions = groups.sync.push(version + 1)  # a sleeping engine wakes to receive
        assert versions == [version + 1] * len(versions), f"step {step}: generators report versions {versions}"
        version += 1
        timings = timer.pop()
        generate_share = timings["timing/generate"] / sum(timings.values())
        run.record(step, version, got, learn, timings, sum(timings.values()), pool)


class Run:
    """What both loops share: the run folder, the actor groups, the prompt stream, the logs, and
    everything a step does after its update (guardrails, metrics, evaluation, checkpoint, upload)."""

    def __init__(self, cfg: Config, run_dir: Path, groups: Groups, prompts: PromptStream,
                 eval_problems: list[Problem], storage: RunStorage | None, start: int):
        self.cfg, self.run_dir, self.groups, self.prompts = cfg, run_dir, groups, prompts
        self.eval_problems, self.storage = eval_problems, storage
        (run_dir / "placement.json").write_text(json.dumps(groups.placement, indent=2))
        self.log, self.timer = RunLog(run_dir, cfg), Timer(trace=cfg.profile.enabled)
        self.pool_log = open(run_dir / "pool.jsonl", "a")
        self.curve: list[float] = []
        self.bad_streak = 0
        self.timeline = Timeline() if cfg.profile.enabled else None
        self.bar = tqdm(range(start, cfg.trainer.total_steps), desc="grpo", initial=start,
                        total=cfg.trainer.total_steps, disable=not cfg.trainer.progress, dynamic_ncols=True)
        self.stop_signal: int | None = None  # SIGTERM received: the run stops after the step in progress
        self.stopping = False  # the step being recorded is the last: it is checkpointed, the loop ends

    def steps(self, start: int):
        for step in self.bar:
            yield step
            if self.stopping:
                print(f"[rlsys] stopped after step {step} on signal {self.stop_signal} (SIGTERM), its checkpoint "
                      f"written: trainer.resume=auto continues the run", flush=True)
                return

    def request_stop(self, signum: int, frame) -> None:
        """SIGTERM (`ray job stop`, a scheduler's preemption, `kill`): the step in progress finishes and is
        checkpointed, then the run ends (exit 0). A second SIGTERM stops at once, as Ctrl-C does."""
        if self.stop_signal is not None:
            raise KeyboardInterrupt(f"signal {signum} received twice")
        self.stop_signal = signum
        print(f"[rlsys] signal {signum} (SIGTERM): the run stops after the step in progress, with a checkpoint "
              f"(send it again to stop at once)", flush=True)

    def record(self, step: int, version: int, got: Collected, learn: dict, timings: dict, step_s: float,
               pool: dict, prompt_state: dict | None = None, extra: dict | None = None) -> None:
        """After step `step`'s update (the generators now serve `version`): guardrails, metrics and
        the sample, evaluation, checkpoint, upload, progress bar. prompt_state: the prompt stream's
        position a resume continues from (None: where it is now)."""
        cfg, rollouts, scores = self.cfg, got.rollouts, got.scores
        self.stopping = self.stop_signal is not None  # read once: a signal from here on stops after the next step
        check_logprob_gap(step, learn, cfg.trainer.logprob_gap_warn, cfg.trainer.logprob_gap_stop)
        self.bad_streak = check_bad_steps(step, learn, self.bad_streak, cfg.learner.max_bad_steps)
        stats = rollout_stats(rollouts, scores, cfg.algo.group_size, cfg.trainer.reflection_words)
        tokens = sum(len(r.prompt_ids) + len(r.response_ids) for r in rollouts)
        metrics = {"weight_version": version, "rollouts/count": len(rollouts),
                   "data/skipped_rows": len(self.prompts.skipped), **stats, **learn, **timings, **got.metrics,
                   **self.groups.rewards.take_metrics(),
                   **(extra or {}), "timing/step": step_s, "tokens/total": tokens,
                   "throughput/tokens_per_s": tokens / step_s, **pool_metrics(pool)}
        self.pool_log.write(json.dumps({"step": step, **pool}) + "\n")
        self.pool_log.flush()
        if pool["events"]:
            (self.run_dir / "placement.json").write_text(json.dumps(self.groups.placement, indent=2))
        last = step + 1 == cfg.trainer.total_steps
        if due(step, cfg.eval.every, last):
            with self.timer.spans.span("eval"):
                metrics |= evaluate(self.groups, self.eval_problems, cfg, self.run_dir / "evals" / f"step_{version}.json")
        sample = {"prompt": got.prompts[0].text, "question": got.prompts[0].question, "completion": rollouts[0].text,
                  "answer": rollouts[0].answer,
                  "reward": scores[0].reward}
        self.log.log(step, metrics, sample)  # before the save: a checkpoint never holds a step the log lacks
        if due(step, cfg.trainer.save_every, last) or last or self.stopping:
            with self.timer.spans.span("save"):
                save(self.groups, self.run_dir, version, self.prompts, cfg, prompt_state, self.storage)
        if self.storage is not None:
            self.storage.upload()
        if self.timeline is not None:
            collect_timeline(self.timeline, self.groups, self.timer)
        self.curve.append(stats["reward/mean"])
        # step: this step's wall time (timing/step; in an asynchronous run its phases overlap, their sum is more)
        self.bar.set_postfix(step=f"{step_s:.2f}s", reward=f"{stats['reward/mean']:.3f}",
                             acc=f"{stats['reward/accuracy']:.2f}",
                             fmt=f"{stats['reward/format']:.2f}", kl=f"{learn.get('kl', 0):.4f}",
                             curve=sparkline(self.curve[-30:]))

    def close(self) -> None:
        self.log.close()
        self.pool_log.close()
        try:
            if self.timeline is not None:  # also after a crash: the trace shows where it stopped
                collect_timeline(self.timeline, self.groups, self.timer)
                self.timeline.write(self.run_dir / "timeline.json")
        finally:
            self.groups.shutdown()
            if self.storage is not None:  # also after a crash: what was written is on the storage
                self.storage.upload()


def save(groups: Groups, run_dir: Path, version: int, prompts: PromptStream, cfg: Config,
         prompt_state: dict | None = None, storage: RunStorage | None = None) -> Path:
    """Checkpoint step_<version>: every learner rank's part, then the driver's; whole or not at all.
    storage: the ranks upload their parts there themselves (rlsys.cluster.storage)."""
    state = driver_state(version, version, prompts, cfg, prompt_state)

    def write(folder: Path) -> dict:
        uploaded = groups.learner.save(folder, storage=storage)
        write_trainer_state(folder, state)
        return uploaded

    return commit(run_dir, version, write, cfg.trainer.keep_last,
                  saves_left(version, cfg.trainer.total_steps, cfg.trainer.save_every))


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


def collect_timeline(timeline: Timeline, groups: Groups, timer: Timer) -> None:
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
        check_local_run(cfg, model_path)
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
    eval_problems = []
    if cfg.eval.every:
        eval_problems, eval_verifier = load_problems(cfg.eval, cfg.data, cfg.generator, tokenizer, cfg.reward.verifier)
        if eval_verifier != verifier:
            raise ConfigError(f"eval.dataset={cfg.eval.dataset} is judged by {eval_verifier}, training data by "
                              f"{verifier}: the reward workers serve one verifier per run")
    return model_path, tokenizer, prompts, eval_problems, verifier


def due(step: int, every: int, last: bool) -> bool:
    """Periodic work after step `step` (0-based): every `every` steps and after the last; never if 0."""
    return every > 0 and ((step + 1) % every == 0 or last)


def evaluate(groups: Groups, problems: list[Problem], cfg: Config, out: Path) -> dict:
    """Held-out evaluation with the weights the generators now serve; the summary goes to the step's metrics."""
    from rlsys.loops.evaluate import write

    summary = run_eval(groups, problems, cfg.eval, cfg.data, cfg.generator.max_tokens, cfg.trainer.seed)
    write(summary, out)
    return {f"eval/{k}": v for k, v in summary.items() if isinstance(v, float) and k != "temperature"
            and k != "top_p"}


def saves_left(done: int, total: int, every: int) -> int:
    """Checkpoints a run of `total` steps still writes after step `done` (steps done): every
    `every` steps and after the last.

    >>> saves_left(2, 10, 2), saves_left(2, 9, 2), saves_left(4, 9, 0), saves_left(9, 9, 2)
    (4, 4, 1, 0)
    """
    return sum(due(step, every, step + 1 == total) or step + 1 == total for step in range(done, total))
