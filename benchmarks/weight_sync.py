"""Weight sync: learner rank 0 -> every generator engine, against a raw broadcast of the same bytes.

For each model size: a learner (1 rank, ZeRO-0) and 2 vLLM generators on the local Ray cluster,
joined in rlsys's sync group. Measured, interleaved, `repeats` times each:
- rlsys: WeightSync.push, the whole path a training step takes (bucket copies, broadcast, the
  engines loading every tensor in place through vLLM's reload path, prefix-cache reset);
- wire: the same push without the load (WeightSync.push_wire): the learner's buckets (views of
  its flat parameters; copies where parameters are not adjacent, as under ZeRO-3), broadcasts,
  the engines' receive buffers, checksums compared;
- raw: one preallocated flat buffer of the same bytes, broadcast over the same group between the
  same processes (no copy, no load): the best the link can do.
Ratio = raw seconds / wire seconds (target >= 0.8); the whole push against raw is reported beside it. On GPU clusters (NCCL) a third figure sets
the time against the link roofline from benchmarks/hardware.yaml.

    python benchmarks/weight_sync.py [--quick]
"""

from __future__ import annotations

import statistics
import time

if __package__ in (None, ""):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Figure, Section, hardware, main, ray_up, rlsys_config, tiny_model

# (hidden, layers, heads): about 1M, 10M, 100M and 450M parameters of a random Qwen2.
SIZES = {"1M": (128, 6, 4), "10M": (384, 8, 6), "100M": (1024, 10, 16), "450M": (2048, 12, 32)}
TARGET = 0.8


def measure(model_path: str, repeats: int, bucket_mb: float, learner: tuple[str, ...] = ("learner.num_ranks=1",)
            ) -> dict:
    import ray

    from rlsys.cluster.groups import init_ray, launch, resolve_backend

    cfg = rlsys_config([f"model.path={model_path}", "learner.mini_batch_size=4",
                        "learner.micro_batch_size=2", "data.prompts_per_step=1", "algo.group_size=4",
                        "reward.num_workers=1", "generator.num_engines=2", "generator.max_tokens=8",
                        "generator.max_model_len=256", f"learner.sync_bucket_mb={bucket_mb}", *learner])
    init_ray(cfg)
    groups = launch(cfg, model_path, "math")
    try:
        sync = groups.sync
        nbytes = sum(m.numel * (4 if m.dtype == "float32" else 2) for b in sync.plan for m in b)
        sync.push(1), sync.push_raw(), sync.push_wire()  # warm-up: first touch of buffers and of the reload path
        ours, raw, load, wire = [], [], [], []
        for i in range(repeats):
            start = time.perf_counter()
            sync.push_wire()
            wire.append(time.perf_counter() - start)
            start = time.perf_counter()
            versions = sync.push(i + 2)
            ours.append(time.perf_counter() - start)
            assert versions == [i + 2] * len(groups.generators.actors)
            whole, waited = ray.get(groups.generators.actors[0].receive_seconds.remote())
            load.append(whole - waited)
            start = time.perf_counter()
            sync.push_raw()
            raw.append(time.perf_counter() - start)
        return {"bytes": nbytes, "buckets": len(sync.plan), "rlsys_s": statistics.median(ours),
                "raw_s": statistics.median(raw), "wire_s": statistics.median(wire),
                "engine_load_s": statistics.median(load), "backend": resolve_backend(cfg.cluster.backend, ray.cluster_resources()),
                "generators": len(groups.generators.actors)}
    finally:
        groups.shutdown()


def run(quick: bool) -> Section:
    sizes = ["1M", "10M", "100M"] if quick else list(SIZES)
    repeats = 3 if quick else 5
    hw = hardware()
    section = Section("weight_sync", {"sizes": sizes, "repeats": repeats, "generators": 2, "bucket_mb": 32.0,
                                      "dtype": "float32"})
    ray_up()
    for size in sizes:
        path, params = tiny_model(*SIZES[size])
        m = measure(path, repeats, 32.0)
        gb = m["bytes"] / 1e9
        row = {"size": size, "params": params, **m, "rlsys_gb_per_s": gb / m["rlsys_s"], "raw_gb_per_s": gb / m["raw_s"]}
        section.rows.append(row)
        print(f"[weight_sync] {size} ({params / 1e6:.1f}M params, {gb:.3f} GB): rlsys {m['rlsys_s']:.3f}s, "
              f"raw {m['raw_s']:.3f}s", flush=True)
        section.figures.append(Figure(
            f"weight sync wire {size} ({params / 1e6:.0f}M params) seconds", m["wire_s"], "s",
            f"raw {m['backend']} broadcast of one flat buffer, same {gb:.3f} GB, same group", m["raw_s"],
            lower_is_better=True, target=TARGET,
            note="the wire part of a push: the learner's buckets (views of its flat parameters), broadcasts, the "
                 "engines' receive buffers and checksums; no load into the model"))
        section.figures.append(Figure(
            f"weight sync {size} ({params / 1e6:.0f}M params) seconds, with the engines' reload", m["rlsys_s"], "s",
            f"raw {m['backend']} broadcast of one flat buffer, same {gb:.3f} GB, same group", m["raw_s"],
            lower_is_better=True,
            note=f"{row['rlsys_gb_per_s']:.2f} GB/s vs {row['raw_gb_per_s']:.2f} GB/s; of rlsys's time, "
                 f"{m['engine_load_s']:.3f}s is vLLM's in-place load in the engine (not waiting on the wire); "
                 f"{m['buckets']} buckets, {m['generators']} generators"))
        if m["backend"] == "nccl":  # a roofline means something for GPU links only
            link = hw["links"]["sync_path"]
            bandwidth = hw["links"][f"{link}_gb_per_s"]
            section.figures.append(Figure(
                f"weight sync {size} vs {link} roofline", m["rlsys_s"], "s",
                f"{gb:.3f} GB / {bandwidth} GB/s ({link}, benchmarks/hardware.yaml)", gb / bandwidth,
                lower_is_better=True))
    # A sharded learner: 2 ZeRO-3 ranks, each sending its partition of every bucket, against rank 0 alone.
    size = "10M" if quick else "100M"
    path, params = tiny_model(*SIZES[size])
    sharded = {all_ranks: measure(path, repeats, 32.0, ("learner.num_ranks=2", "learner.zero_stage=3",
                                                        f"learner.sync_from_all_ranks={all_ranks}"))
               for all_ranks in (False, True)}
    section.rows.append({"size": size, "params": params, "zero3_two_ranks": {str(k): v for k, v in sharded.items()}})
    section.figures.append(Figure(
        f"weight sync {size} from 2 ZeRO-3 ranks, each sending its buckets", sharded[True]["rlsys_s"], "s",
        "learner rank 0 sending every bucket (learner.sync_from_all_ranks=false), same group sizes",
        sharded[False]["rlsys_s"], lower_is_better=True,
        note=f"whole push incl. the engines' reload ({sharded[True]['engine_load_s']:.3f}s of it); wire alone: "
             f"{sharded[True]['wire_s']:.3f}s vs {sharded[False]['wire_s']:.3f}s; each rank sends its own ZeRO-3 "
             f"partition of every bucket (no gather), where rank 0 alone gathers every bucket first"))
    if section.rows and section.rows[0]["backend"] != "nccl":
        section.params["roofline"] = "not computed: gloo backend (CPU); the link roofline applies to NCCL clusters"
    return section


if __name__ == "__main__":
    main(run)
