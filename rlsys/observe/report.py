"""rlsys report RUN_DIR: the run's figures in a few lines, and plots of them.

Prints the reward at the start and the end, wall time (per step too) and the phases' split (in an
asynchronous run the phases overlap: the overlap is printed, not added to the loop time); writes
`reward.png` (mean reward and its accuracy and format parts per step), `timing.png` (seconds
per phase per step), `lengths.png`, `signatures.png` and, in a run with tools, `tools.png` into the
run folder, and `samples.md`: the logged sample answer of the first, middle and last step.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from rlsys.observe.metrics import read_jsonl

PHASES = ("generate", "reward", "learn", "sync")


def summarize(rows: list[dict], window: int = 10) -> dict:
    if not rows:
        raise ValueError("metrics.jsonl has no steps")
    w = min(window, max(1, len(rows) // 3))  # first and last windows never overlap
    mean = lambda key, part: statistics.fmean(r[key] for r in part)  # noqa: E731
    # Wall time per step as the loop measured it (timing/step); older logs lack it, and there the
    # phases ran one after another. In an asynchronous run the phases overlap: their sum exceeds
    # the wall time by the overlap, which is reported as such, never as loop time.
    step_s = [r.get("timing/step", sum(r[f"timing/{p}"] for p in PHASES)) for r in rows]
    phase_s = {p: sum(r[f"timing/{p}"] for r in rows) for p in PHASES}
    return {
        "steps": len(rows),
        "reward_first": mean("reward/mean", rows[:w]),
        "reward_last": mean("reward/mean", rows[-w:]),
        "accuracy_first": mean("reward/accuracy", rows[:w]),
        "accuracy_last": mean("reward/accuracy", rows[-w:]),
        "window": w,
        "loop_s": sum(step_s),
        "step_s": statistics.median(step_s),
        "overlap_s": max(0.0, sum(phase_s.values()) - sum(step_s)),
        "split": {p: v / sum(phase_s.values()) for p, v in phase_s.items()},  # shares of the phases' time
        "tokens_per_s": statistics.fmean(r["throughput/tokens_per_s"] for r in rows[1:] or rows),
    }


def plot(rows: list[dict], run_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("reward/mean", "reward (mean)"), ("reward/accuracy", "accuracy"), ("reward/format", "format")):
        ax.plot(steps, [r[key] for r in rows], label=label)
    ax.set(xlabel="step", ylabel="per-sample mean", ylim=(-0.02, 1.02), title=f"GRPO reward: {run_dir.name}")
    ax.legend()
    fig.tight_layout()
    out = [run_dir / "reward.png", run_dir / "timing.png", run_dir / "lengths.png"]
    fig.savefig(out[0], dpi=100)
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0.0] * len(rows)
    for p in PHASES:
        vals = [r[f"timing/{p}"] for r in rows]
        ax.bar(steps, vals, bottom=bottom, label=p, width=1.0)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set(xlabel="step", ylabel="seconds", title="step time by phase")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out[1], dpi=100)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["response_length/mean"] for r in rows], label="mean")
    ax.plot(steps, [r["response_length/max"] for r in rows], label="max")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["truncated_frac"] for r in rows], "k:", label="truncated (right axis)")
    ax2.set(ylabel="truncated share", ylim=(-0.02, 1.02))
    ax.set(xlabel="step", ylabel="response tokens", title="response lengths")
    ax.legend(loc="upper left")
    ax2.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out[2], dpi=100)
    out.append(signatures(rows, run_dir, plt))
    if "tools/used_frac" in rows[0]:
        out.append(tool_use(rows, run_dir, plt))
    plt.close("all")
    return out


def signatures(rows: list[dict], run_dir: Path, plt) -> Path:
    """signatures.png: R1-Zero's four curves side by side: accuracy (training samples, and the
    held-out pass@1 of each evaluation), format share, mean response length, and the share of
    responses with reflection words (trainer.reflection_words; absent from older logs)."""
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharex=True)
    (acc, fmt), (length, reflect) = axes
    acc.plot(steps, [r["reward/accuracy"] for r in rows], label="training samples")
    # Each evaluation at the step whose samples the same weights drew: evals/step_V.json holds weight
    # version V, which samples step V (V = 0: the untrained model, evaluated before the first step).
    held = sorted((version, summary["pass@1"]) for version, summary in evaluations(run_dir))
    if held:
        acc.plot(*zip(*held), "o-", label="held-out pass@1")
    acc.set(ylabel="accuracy", ylim=(-0.02, 1.02))
    acc.legend()
    fmt.plot(steps, [r["reward/format"] for r in rows])
    fmt.set(ylabel="format reward", ylim=(-0.02, 1.02))
    length.plot(steps, [r["response_length/mean"] for r in rows])
    length.set(xlabel="step", ylabel="mean response tokens")
    reflect.plot(steps, [r.get("response/reflection_frac", float("nan")) for r in rows])
    reflect.set(xlabel="step", ylabel="reflection share", ylim=(-0.02, 1.02))
    fig.suptitle(f"R1-Zero signatures: {run_dir.name}")
    fig.tight_layout()
    path = run_dir / "signatures.png"
    fig.savefig(path, dpi=100)
    return path


def tool_use(rows: list[dict], run_dir: Path, plt) -> Path:
    """tools.png, for a run with generator.tools: whether the model learns to use its tool where it
    pays: the share of rollouts that called a tool and the tool calls that failed (per rollout),
    beside accuracy (training samples, and each evaluation's held-out pass@1 and its own tool use)."""
    steps = [r["step"] for r in rows]
    fig, (use, acc) = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    use.plot(steps, [r["tools/used_frac"] for r in rows], label="rollouts that called a tool")
    use.plot(steps, [r["tools/errors_mean"] for r in rows], label="failed calls per rollout")
    held = evaluations(run_dir)  # in version order
    used = [(version, s["tools/used_frac"]) for version, s in held if "tools/used_frac" in s]
    if used:
        use.plot(*zip(*used), "o-", label="held-out: rollouts that called a tool")
    use.set(xlabel="step", ylabel="share / per rollout", ylim=(-0.02, 1.02))
    use.legend()
    acc.plot(steps, [r["reward/accuracy"] for r in rows], label="training samples")
    if held:
        acc.plot([v for v, _ in held], [s["pass@1"] for _, s in held], "o-", label="held-out pass@1")
    acc.set(xlabel="step", ylabel="accuracy", ylim=(-0.02, 1.02))
    acc.legend()
    fig.suptitle(f"tool use: {run_dir.name}")
    fig.tight_layout()
    path = run_dir / "tools.png"
    fig.savefig(path, dpi=100)
    return path


def sample_table(run_dir: Path) -> str:
    """A markdown table of the sample answer logged (samples.jsonl, one a step) at the first, middle
    and last step: question, completion (after the prompt, so without data.prefill), gold, reward.
    "" when the run logged none.

    >>> import json, tempfile
    >>> run = Path(tempfile.mkdtemp())
    >>> _ = (run / "samples.jsonl").write_text("".join(json.dumps({"step": s, "question": "1 + 2 =",
    ...     "completion": f" {s} | {s}\\n", "answer": "3", "reward": s / 4}) + "\\n" for s in range(5)))
    >>> print(sample_table(run))
    | step | question | completion | gold | reward |
    |---|---|---|---|---|
    | 0 | 1 + 2 = | 0 \\| 0 | 3 | 0.00 |
    | 2 | 1 + 2 = | 2 \\| 2 | 3 | 0.50 |
    | 4 | 1 + 2 = | 4 \\| 4 | 3 | 1.00 |
    """
    path = run_dir / "samples.jsonl"
    found = read_jsonl(path) if path.is_file() else []
    if not found:
        return ""
    picked = [found[i] for i in sorted({0, len(found) // 2, len(found) - 1})]

    def cell(text: str) -> str:
        return " ".join(text.replace("|", "\\|").split())

    lines = ["| step | question | completion | gold | reward |", "|---|---|---|---|---|"]
    for r in picked:
        question = r.get("question") or r["prompt"][-200:]  # logs before the question was logged: the prompt's end
        lines.append(f"| {r['step']} | {cell(question)} | {cell(r['completion'])} | {cell(r['answer'])} "
                     f"| {r['reward']:.2f} |")
    return "\n".join(lines)


def evaluations(run_dir: Path) -> list[tuple[int, dict]]:
    """(weight version, summary) of every held-out evaluation of the run (evals/step_V.json), in order."""
    import json

    found = sorted((int(p.stem.removeprefix("step_")), p) for p in (run_dir / "evals").glob("step_*.json"))
    return [(version, json.loads(p.read_text())) for version, p in found]


def eval_line(run_dir: Path) -> str:
    """Held-out figures of the first and last evaluation of the run, if it made any."""
    found = evaluations(run_dir)
    if not found:
        return ""
    (first, a), (last, b) = found[0], found[-1]
    k = a["k"]
    return (f"held-out     pass@1 {a['pass@1']:.3f} (step {first}) -> {b['pass@1']:.3f} (step {last}); "
            f"cons@{k} {a[f'cons@{k}']:.3f} -> {b[f'cons@{k}']:.3f}; format {a['format']:.3f} -> {b['format']:.3f}\n")


def utilisation_line(run_dir: Path) -> str:
    """Busy shares per actor group, from the timeline of a profiled run (profile.enabled=true)."""
    from rlsys.observe.profile import busy_split, read_tracks

    path = run_dir / "timeline.json"
    if not path.is_file():
        return ""
    tracks = read_tracks(path)
    steps = sum(s["name"] == "step" for s in tracks.get("driver", []))
    groups = busy_split(tracks, skip_steps=1 if steps > 1 else 0)
    parts = [f"{role} " + " ".join(f"{p} {100 * v:.0f}%" for p, v in shares.items()) for role, shares in groups.items()]
    return f"actors       {'; '.join(parts)} (timeline: {path})\n"


def report(run_dir: Path) -> str:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} an rlsys run folder?)")
    rows = read_jsonl(path)
    s = summarize(rows)
    plots = plot(rows, run_dir)
    split = ", ".join(f"{p} {100 * v:.0f}%" for p, v in s["split"].items())
    overlap = (f"; the phases overlapped {s['overlap_s']:.1f}s (asynchronous)" if s["overlap_s"] > 0.01 * s["loop_s"]
               else "")
    evals = eval_line(run_dir) + utilisation_line(run_dir)
    samples = sample_table(run_dir)
    if samples:
        (run_dir / "samples.md").write_text(samples + "\n")
        evals += f"samples      {run_dir / 'samples.md'} (the first, middle and last step's logged answer)\n"
    return (f"{run_dir}: {s['steps']} steps, loop {s['loop_s']:.1f}s wall, {s['step_s']:.2f}s a step (median) "
            f"({split}{overlap})\n"
            f"reward/mean  first {s['window']} steps {s['reward_first']:.3f} -> last {s['window']} {s['reward_last']:.3f}\n"
            f"accuracy     first {s['window']} steps {s['accuracy_first']:.3f} -> last {s['window']} {s['accuracy_last']:.3f}\n"
            f"throughput   {s['tokens_per_s']:.0f} tokens/s\n{evals}"
            f"plots        {', '.join(str(p) for p in plots)}")
