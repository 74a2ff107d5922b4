"""Will a local run fit this machine? An estimate of the memory its actors take, checked before
any actor starts (a run that does not fit would start engines and thrash until killed).

Per process, measured on the tiny model on CPU: a vLLM engine ~0.9 GiB before its KV cache, a
learner rank ~0.7 GiB, a reward worker ~0.4 GiB; then what each holds of the model.
"""

from __future__ import annotations

from pathlib import Path

from rlsys.config import Config, ConfigError

GIB = 1 << 30
ENGINE_BASE, LEARNER_BASE, REWARD_BASE = 0.9 * GIB, 0.7 * GIB, 0.4 * GIB


def model_params(model_path: str) -> int:
    """Parameter count from the safetensors headers (nothing is loaded)."""
    from safetensors import safe_open

    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_path}")
    total = 0
    for f in files:
        with safe_open(f, "pt") as st:
            for name in st.keys():
                n = 1
                for d in st.get_slice(name).get_shape():
                    n *= d
                total += n
    return total


def memory_need(cfg: Config, params: int) -> dict[str, float]:
    """Bytes each role needs in all, an upper-bound estimate.

    The defaults (2 engines with 1 GiB of KV cache, 2 ZeRO-0 ranks, fp32, KL on) for 1e9 parameters
    (3.73 GiB in fp32): engines 2 x (0.9 + 1 + 3.73) = 11.25 GiB; a rank holds weights + gradients
    (7.45), Adam's two moments (7.45) and the reference (3.73) beside its 0.7: 2 x 19.33 = 38.65 GiB.

    >>> from rlsys.config import load_config
    >>> need = memory_need(load_config(None), 10**9)
    >>> round(need["generators"] / GIB, 2), round(need["learners"] / GIB, 2)
    (11.25, 38.65)
    """
    weight = 2 if cfg.model.dtype == "bfloat16" else 4
    engines = cfg.generator.num_engines * (ENGINE_BASE + cfg.generator.kv_cache_gib * GIB + params * weight)
    ranks = cfg.learner.num_ranks
    # each rank: its weights and gradients; fp32 Adam moments (and bf16's fp32 master copy), split over
    # the ranks from ZeRO-1 on; a frozen reference copy when the KL term is on
    optimizer = params * 4 * (2 + (weight == 2))
    per_rank = (LEARNER_BASE + params * weight * 2 + optimizer / (ranks if cfg.learner.zero_stage >= 1 else 1)
                + (params * weight if cfg.algo.beta > 0 else 0))
    return {"generators": engines, "learners": ranks * per_rank,
            "reward workers": cfg.reward.num_workers * REWARD_BASE}


def check_fits(cfg: Config, params: int, available: int) -> None:
    """Stop with the numbers when the estimate exceeds the memory this machine has available."""
    need = memory_need(cfg, params)
    total = sum(need.values())
    if total > available:
        parts = ", ".join(f"{role} {b / GIB:.1f} GiB" for role, b in need.items())
        raise ConfigError(
            f"this run needs about {total / GIB:.1f} GiB of memory on this machine ({parts}: generator.num_engines="
            f"{cfg.generator.num_engines} x (engine + generator.kv_cache_gib={cfg.generator.kv_cache_gib} + the "
            f"model), learner.num_ranks={cfg.learner.num_ranks}, reward.num_workers={cfg.reward.num_workers}; "
            f"{params / 1e6:.1f}M parameters), and {available / GIB:.1f} GiB is available: it would thrash. Use fewer "
            f"engines or ranks, a smaller KV cache, or a cluster (cluster.address)")
