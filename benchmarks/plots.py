"""Plots of a result JSON, written beside it: <results>/<stem>/*.png.

    python benchmarks/plots.py benchmarks/results/<timestamp>.json

Each plot is drawn on its own: one that raises (a row shape it does not know, a missing key) is
printed with its error and traceback and named in Plots.failed, and every other plot is still
written. draw_plots returns both; plot_all (what a benchmark script calls after writing its
JSON) raises PlotsFailed naming the failed plots once the others are written.
"""

from __future__ import annotations

import json
import statistics
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Plots:
    written: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    """plot name -> "ErrorType: message" of what it raised"""


class PlotsFailed(RuntimeError):
    def __init__(self, plots: Plots):
        super().__init__("plots that failed (the others are written: "
                         + ", ".join(str(p) for p in plots.written) + "): "
                         + "; ".join(f"{name}: {error}" for name, error in plots.failed.items()))
        self.plots = plots


def draw_plots(result_path: Path) -> Plots:
    """Every plot of the result's benchmarks, and targets.png; a plot that raises is printed and
    recorded in .failed, the others still written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.loads(Path(result_path).read_text())
    out_dir = Path(result_path).with_suffix("")
    out_dir.mkdir(parents=True, exist_ok=True)
    benches = result["benchmarks"]
    jobs = [(name, draw, benches[name]) for name, draw in PLOTS.items() if name in benches]
    jobs.append(("targets", _targets, benches))
    plots = Plots()
    for name, draw, data in jobs:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        path = out_dir / f"{name}.png"
        try:
            if draw(ax, data) is not False:  # _targets: False when no figure has a target
                fig.tight_layout()
                fig.savefig(path, dpi=100)
                plots.written.append(path)
        except Exception as e:  # noqa: BLE001 -- one plot's bug must not cost the others; it is reported
            traceback.print_exc()
            plots.failed[name] = f"{type(e).__name__}: {e}"
            print(f"plot {name} FAILED ({result_path}): {plots.failed[name]}", file=sys.stderr, flush=True)
        finally:
            plt.close(fig)
    return plots


def plot_all(result_path: Path) -> list[Path]:
    """draw_plots, raising PlotsFailed after the others are written when any plot failed."""
    plots = draw_plots(result_path)
    if plots.failed:
        raise PlotsFailed(plots)
    return plots.written


def _bars(ax, labels: list[str], values: list[float], ylabel: str, title: str, colors=None) -> None:
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)), labels, rotation=20, ha="right", fontsize=8)
    ax.set(ylabel=ylabel, title=title)
    ax.margins(y=0.15)
    for i, v in enumerate(values):
        ax.annotate(f"{v:.0f}" if v >= 100 else f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=8)


def _rollout(ax, bench: dict) -> None:
    labels, values, colors = [], [], []
    for r in bench["rows"]:
        if r["what"] == "vllm_vs_hf":
            tokens = r["prompts"] * r["n"] * r["tokens"]
            labels += [f"{r['model']}\nvLLM", f"{r['model']}\nHF generate"]
            values += [tokens / r["vllm_s"], tokens / r["hf_s"]]
            colors += ["tab:blue", "tab:gray"]
        elif r["what"] == "pool":
            labels.append(f"pool {r['engines']} eng\n{r['prompts']}x{r['n']}")
            values.append(r["tokens_per_s"])
            colors.append("tab:green")
    _bars(ax, labels, values, "generated tokens/s", "rollout: vLLM vs HF generate; generator pool", colors)


def _reward(ax, bench: dict) -> None:
    worker = bench["figures"][0]
    pools = [r for r in bench["rows"] if r["what"] == "pool"]
    _bars(ax, ["in-process rule\n(no timeout)", "reward worker\n(killable child)"]
          + [f"Ray pool\n{r['workers']} worker(s)" for r in pools],
          [worker["reference"]["value"], worker["value"]] + [r["samples_per_s"] for r in pools],
          "samples/s", "reward: scoring throughput")


def _learner(ax, bench: dict) -> None:
    rows = bench["rows"]
    peak = bench["params"]["peak_flops_per_s"]
    labels = [f"{r['model']}\nZeRO-{r['zero']} {r['dtype'].replace('bfloat', 'bf').replace('float', 'fp')}"
              for r in rows]
    against = "override" if bench["params"].get("peak_source", "").startswith("override") else "matmul roofline"
    _bars(ax, labels, [r["tokens_per_s"] for r in rows], "training tokens/s",
          f"learner: tokens/s (MFU vs {against} above bars)")
    for i, r in enumerate(rows):
        ax.annotate(f"MFU {100 * r['flops_per_s'] / peak[r['dtype']]:.0f}%", (i, r["tokens_per_s"]),
                    xytext=(0, 12), textcoords="offset points", ha="center", fontsize=7, color="tab:red")


def _weight_sync(ax, bench: dict) -> None:
    """Seconds against parameters per model size (rank 0 of one learner rank sends), and the
    2-rank ZeRO-3 row as points of its own: rank 0 gathering and sending every bucket against
    each rank sending its partition (learner.sync_from_all_ranks)."""
    sizes = [r for r in bench["rows"] if "zero3_two_ranks" not in r]
    sharded = [r for r in bench["rows"] if "zero3_two_ranks" in r]
    params = [r["params"] for r in sizes]
    ax.loglog(params, [r["rlsys_s"] for r in sizes], "o-", label="rlsys push over the collective (wire + engine load)")
    ax.loglog(params, [r["raw_s"] for r in sizes], "s--", label="raw flat-buffer broadcast, same bytes")
    ax.loglog(params, [r["engine_load_s"] for r in sizes], "^:", label="of which: vLLM in-place load")
    handle = [r for r in sizes if "handle" in r["repeats_s"]]  # runs since 2026-12-05
    if handle:
        ax.loglog([r["params"] for r in handle], [statistics.median(r["repeats_s"]["handle"]) for r in handle], "o-",
                  color="tab:green", label="rlsys push by handle (engines on the learner's node)")
        ax.loglog([r["params"] for r in handle], [statistics.median(r["repeats_s"]["between"]) for r in handle], "x:",
                  color="tab:gray", label="one memcpy of the bytes")
    for r in sharded:
        by = r["zero3_two_ranks"]  # {"False": rank 0 sends everything, "True": every rank its part}
        ax.loglog([r["params"]], [by["False"]["rlsys_s"]], "D", color="tab:red", markerfacecolor="none",
                  label=f"2 ZeRO-3 ranks, rank 0 gathers and sends ({r['size']})")
        ax.loglog([r["params"]], [by["True"]["rlsys_s"]], "D", color="tab:red",
                  label=f"2 ZeRO-3 ranks, each sends its partition ({r['size']})")
    one = (sizes or [m for r in sharded for m in r["zero3_two_ranks"].values()])[0]
    ax.set(xlabel="parameters", ylabel="seconds", title=f"weight sync to {one['generators']} engines "
                                                        f"({one['backend']})")
    ax.legend(fontsize=8)


def _weight_sync_link(ax, bench: dict) -> None:
    """Gb/s on the wire (push_wire) and of the raw broadcast per size and link, the link's rate
    as a black bar across each group: a bar reaching it would carry every bit the link allows."""
    rows = bench["rows"]
    width = 0.38
    for i, r in enumerate(rows):
        wire, raw = r["bytes"] * 8 / r["wire_s"] / 1e9, r["bytes"] * 8 / r["raw_s"] / 1e9
        ax.bar(i - width / 2, wire, width, color="tab:blue", label="rlsys wire (push_wire)" if i == 0 else None)
        ax.bar(i + width / 2, raw, width, color="tab:gray", label="raw flat-buffer broadcast" if i == 0 else None)
        if r["rate_mbit"] is not None:
            ax.plot([i - 0.45, i + 0.45], [r["rate_mbit"] / 1000] * 2, "k-",
                    label="link rate (tc tbf)" if r is next(x for x in rows if x["rate_mbit"]) else None)
            ax.annotate(f"{r['limit_s'] / r['wire_s']:.2f}x", (i - width / 2, wire), ha="center", va="bottom",
                        fontsize=8)
    labels = [f"{r['size']}\n" + ("unshaped" if r["rate_mbit"] is None else f"{r['rate_mbit'] / 1000:g} Gb/s")
              for r in rows]
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set(ylabel="Gb/s (payload)", title="weight sync on shaped links: learner node -> engine node "
                                          "(above bars: limit / wire)")
    ax.legend(fontsize=8)


def _end_to_end(ax, bench: dict) -> None:
    labels, bottoms = [], []
    phases = ["generate", "receive_weights", "score", "train", "broadcast_weights", "share_weights", "idle"]
    colors = dict(zip(phases, ["tab:blue", "tab:cyan", "tab:orange", "tab:green", "tab:olive", "tab:brown",
                               "lightgray"]))
    rows = [(r["workload"], g, shares) for r in bench["rows"] for g, shares in r["groups"].items()]
    for i, (workload, group, shares) in enumerate(rows):
        left = 0.0
        for p in phases:
            v = shares.get(p, 0.0)
            ax.barh(i, v, left=left, color=colors[p], label=p if i == 0 else None)
            left += v
        labels.append(f"{workload}: {group}")
        bottoms.append(i)
    ax.set_yticks(bottoms, labels, fontsize=8)
    ax.set(xlabel="share of step wall time", title="end to end: what each actor group does during a step")
    ax.legend(fontsize=7, loc="lower right")


def _peer(ax, bench: dict) -> None:
    labels, values, colors = [], [], []
    for r in bench["rows"]:
        labels += [f"{r['workload']}\nrlsys", f"{r['workload']}\nTRL GRPOTrainer"]
        values += [r["rlsys"]["tokens_per_s"], r["trl"]["tokens_per_s"]]
        colors += ["tab:blue", "tab:gray"]
    _bars(ax, labels, values, "tokens/s (prompt + completion)", "end-to-end GRPO: rlsys vs TRL, same workload",
          colors)


def _scaling(ax, bench: dict) -> None:
    """Measured tokens/s against engine count, the ideal linear line from the 1-engine run beside
    it, and the generate phase per engine count on the right axis."""
    rows = sorted((r for r in bench["rows"] if r["what"] == "engines"), key=lambda r: r["engines"])
    engines = [r["engines"] for r in rows]
    base = next(r["tokens_per_s"] for r in rows if r["engines"] == 1)
    ax.plot(engines, [r["tokens_per_s"] for r in rows], "o-", color="tab:blue", label="measured tokens/s")
    ax.plot(engines, [n * base for n in engines], "k--", label="ideal linear (N x 1 engine)")
    ax.set_xticks(engines)
    ax.set(xlabel="generator engines (one rollout node each)", ylabel="tokens/s (prompt + completion)",
           title=f"scaling: tiny GRPO, {rows[0]['ranks']} learner ranks, on {bench['params']['cores']} cores "
                 f"shared by every actor")
    right = ax.twinx()
    right.plot(engines, [r["generate_s_mean"] for r in rows], "s:", color="tab:orange", label="generate phase (s)")
    right.set_ylabel("generate phase, s per step")
    right.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="center left")


def _scaling_split(ax, bench: dict) -> None:
    g, l = bench["params"]["generator_num_cpus"], bench["params"]["learner_num_cpus"]
    rows = sorted(bench["rows"], key=lambda r: (r["asked_cpus"], -r["ranks"]))
    _bars(ax, [f"{r['engines']} gen + {r['ranks']} learner\n({r['engines'] * g + r['ranks'] * l:g} CPUs)"
               for r in rows],
          [r["tokens_per_s"] for r in rows], "tokens/s (prompt + completion)",
          f"scaling: generator / learner split of the same CPUs ({bench['params']['cores']} cores shared)")


def _scaling_link(ax, bench: dict) -> None:
    """Tokens/s against the rollout pool's size, one line per link rate; the sync phase per step
    (dotted, right axis) for the same runs."""
    rates = sorted({r["rate_mbit"] for r in bench["rows"]}, key=lambda x: -(x or float("inf")))
    right = ax.twinx()
    for k, rate in enumerate(rates):
        rows = sorted((r for r in bench["rows"] if r["rate_mbit"] == rate), key=lambda r: r["engines"])
        label = "unshaped" if rate is None else f"{rate / 1000:g} Gb/s" if rate >= 1000 else f"{rate:g} Mb/s"
        color = f"C{k}"
        ax.plot([r["engines"] for r in rows], [r["tokens_per_s"] for r in rows], "o-", color=color,
                label=f"tokens/s, {label}")
        right.plot([r["engines"] for r in rows], [r["phases_s_mean"]["sync"] for r in rows], "s:", color=color,
                   label=f"sync s/step, {label}")
    ax.set_xticks(sorted({r["engines"] for r in bench["rows"]}))
    ax.set(xlabel="generator engines (one isolated rollout node each)", ylabel="tokens/s (prompt + completion)",
           title=f"scaling as the links slow: {bench['params']['model']['params'] / 1e6:.0f}M tiny model, "
                 f"{bench['params']['cores']} cores shared by every node")
    ax.set_ylim(bottom=0)
    right.set_ylabel("sync phase, s per step")
    right.set_ylim(bottom=0)
    lines, more = ax.get_legend_handles_labels(), right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="lower left")


def _targets(ax, benches: dict) -> bool:
    figs = [f for b in benches.values() for f in b["figures"] if f["target"] is not None]
    if not figs:
        return False
    ratios = [f["ratio"] for f in figs]
    colors = ["tab:green" if f["target"]["met"] else "tab:red" for f in figs]
    ax.barh(range(len(figs)), ratios, color=colors)
    for i, f in enumerate(figs):
        ax.plot([f["target"]["min_ratio"]] * 2, [i - 0.4, i + 0.4], "k-")
        lo, hi = f.get("ratio_range") or (f["ratio"], f["ratio"])  # older results kept one measurement
        ax.plot([lo, hi], [i, i], color="0.25", lw=1.5)
    ax.set_yticks(range(len(figs)), [f["name"][:50] for f in figs], fontsize=7)
    ax.set(xlabel="ratio to the reference: median, grey line lowest to highest repeat (black: target)",
           title="targets: green met by the lowest repeat, red missed")
    return True


def _packing(ax, bench: dict) -> None:
    """Learner tokens/s per micro-batch layout (median of the rounds, the range as an error bar)."""
    row = next(r for r in bench["rows"] if r["what"] == "throughput")
    layouts = list(row["tokens_per_s"])
    tokens = row["tokens"]
    lows = [tokens / max(row["seconds_repeats"][k]) for k in layouts]
    highs = [tokens / min(row["seconds_repeats"][k]) for k in layouts]
    values = [row["tokens_per_s"][k] for k in layouts]
    _bars(ax, layouts, values, "learner tokens/s", "packing: micro-batch layouts (bars: lowest to highest round)")
    ax.errorbar(range(len(layouts)), values, yerr=[[v - lo for v, lo in zip(values, lows)],
                                                   [hi - v for v, hi in zip(values, highs)]], fmt="none", ecolor="k")


def _overlap(ax, bench: dict) -> None:
    """Mean reward against seconds of training, every synchronous and asynchronous run (the
    asynchronous one should get as far in less time)."""
    for row in bench["rows"]:
        for mode, color in (("synchronous", "tab:blue"), ("asynchronous", "tab:orange")):
            for i, run in enumerate(row[mode]):
                ax.plot(run["elapsed_s"], run["reward"], color=color, alpha=0.8,
                        label=f"{row['workload']}: {mode}" if i == 0 else None)
    ax.set(xlabel="seconds of training (sum of step times)", ylabel="mean reward of the step's rollouts",
           title="overlap: reward against time, every run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _limits(ax, bench: dict) -> None:
    """Where each stage's time goes, one bar per stage and precision: the measured time is the
    whole bar (1.0), split into its parts; the black tick is the stage's limit on this machine,
    as a share of the measured time (the further left, the further the stage is from it)."""
    import matplotlib.pyplot as plt

    rows = bench["rows"]
    parts = list(dict.fromkeys(k for r in rows for k in r["parts"]))
    colors = dict(zip(parts, plt.get_cmap("tab20").colors))
    for i, r in enumerate(rows):
        left = 0.0
        total = sum(r["parts"].values())
        for part, seconds in r["parts"].items():
            width = seconds / total
            ax.barh(i, width, left=left, color=colors[part], label=part if i == [
                j for j, q in enumerate(rows) if part in q["parts"]][0] else None)
            left += width
        share = r["limit_s"] / r["measured_s"]
        ax.plot([share] * 2, [i - 0.45, i + 0.45], "k-", lw=2)
        ax.annotate(f"{_seconds(r['measured_s'])}, limit {_seconds(r['limit_s'])} ({100 * share:.0f}%)",
                    (1.01, i), va="center", fontsize=7, annotation_clip=False)
    short = {"float32": "fp32", "bfloat16": "bf16"}
    ax.set_yticks(range(len(rows)), [f"{r['stage']} {short.get(r['dtype'], r['dtype'])}" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set(xlabel="share of the stage's measured time (black: its limit on this machine)",
           title="where the step goes, and each stage's distance to its limit")
    ax.legend(fontsize=6, loc="lower left", bbox_to_anchor=(0, -0.5), ncol=4, frameon=False)


def _seconds(s: float) -> str:
    return f"{1e3 * s:.0f} ms" if s < 1 else f"{s:.2f} s"


PLOTS = {"rollout": _rollout, "reward": _reward, "learner": _learner, "weight_sync": _weight_sync,
         "weight_sync_link": _weight_sync_link,
         "end_to_end": _end_to_end, "peer": _peer, "scaling": _scaling, "scaling_split": _scaling_split,
         "scaling_link": _scaling_link, "limits": _limits,
         "packing": _packing, "overlap": _overlap}

if __name__ == "__main__":
    print("\n".join(str(p) for p in plot_all(Path(sys.argv[1]))))
