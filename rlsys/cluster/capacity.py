"""Will a local run fit this machine? An estimate of the memory its actors take, checked before
any actor starts (a run that does not fit would start engines and thrash until killed).

Per process, measured on the tiny model on CPU: a vLLM engine ~0.9 GiB before its KV cache, a
learner rank ~0.7 GiB, a reward worker ~0.4 GiB; then what each holds of the model.

Where the actors run on GPUs (cluster.backend nccl, or auto on a machine with GPUs: the local Ray
cluster then has them, rlsys.cluster.placement.resolve_backend), the model's state is counted per
GPU, against that GPU's free memory, and only the processes themselves against host memory. A
GPU holds a learner rank's state (weights, gradients, optimizer, reference; ZeRO partitions
counted) or an engine's vLLM share (generator.gpu_memory_utilization of the GPU's memory: weights,
activations and KV cache; vLLM refuses to start when that much is not free), or both when
colocated. A learner rank's activations are counted beside its state (:func:`activation_bytes`:
one micro-batch's forward pass kept for the backward, from the model's width and depth).

A model that is not a local folder (a hub id) is not measured: the actors resolve it on their
nodes, and the driver need not be able to reach the hub; the check is skipped, saying so.
"""

from __future__ import annotations

import os
from pathlib import Path

from rlsys.config import Config, ConfigError, engine_memory_share, on_device

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


def model_shape(model_path: str) -> tuple[int, int] | None:
    """(hidden size, layers) from the model's config.json: what a learner's activations scale with;
    None, saying so, for a config without hidden_size and num_hidden_layers (the check then counts
    the model's state alone)."""
    import json

    path = Path(model_path) / "config.json"
    config = json.loads(path.read_text())
    if "hidden_size" not in config or "num_hidden_layers" not in config:
        print(f"[rlsys] memory check: {path} has no hidden_size and num_hidden_layers; the learners' "
              f"activations are not counted", flush=True)
        return None
    return int(config["hidden_size"]), int(config["num_hidden_layers"])


ACTIVATION_BYTES = 34
"""Bytes a decoder layer keeps for the backward pass per token and per unit of hidden size, at
2-byte activations and no recomputation (Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models": 34sbh per layer; their 5as^2b term for the attention
scores is left out, since SDPA kernels keep no s x s matrix; the output layer's logits are left
out too, since rlsys computes them in learner.logprob_chunk pieces). fp32 doubles it. Checked on
CPU (configs/r1_zero_sums.yaml, SmolLM2-135M: 576 wide, 30 layers, fp32): a rank's peak resident
memory was 6.5 GB at 1024 tokens a micro-batch and 7.8 GB at 2048, 1.3 GB per 1024 tokens, which
is 37 bytes at 2-byte activations. The rest of that peak, ~5.2 GB, is ~2.3 GB more than
LEARNER_BASE and rank_state count (optimizer temporaries and the freed memory the learner's heap
keeps, rlsys.actors.heap): the estimate stays low by that much on CPUs, and an engine measured
3.5 GB resident where memory_need counts 2.4."""


def micro_batch_tokens(cfg: Config) -> int:
    """The most tokens one micro-batch can hold: the token budget (a row longer than it goes alone,
    up to generator.max_model_len), or micro_batch_size rows of up to max_model_len each."""
    budget, longest = cfg.learner.max_tokens_per_micro_batch, cfg.generator.max_model_len
    return max(budget, longest) if budget > 0 else cfg.learner.micro_batch_size * longest


def activation_bytes(cfg: Config, hidden: int, layers: int) -> float:
    """One learner rank's activation memory for its largest micro-batch (:data:`ACTIVATION_BYTES`).
    With gradient checkpointing each layer keeps only its input, and one layer at a time is
    recomputed whole.

    SmolLM2-135M in fp32 at the default budget of 2048 tokens: 68 x 2048 x 576 x 30 = 2.24 GiB;
    checkpointed: 4 x 2048 x 576 x 30 + 68 x 2048 x 576 = 0.21 GiB.

    >>> from rlsys.config import load_config
    >>> cfg = load_config(None, ["model.dtype=float32"])
    >>> round(activation_bytes(cfg, 576, 30) / GIB, 2)
    2.24
    >>> cfg.learner.gradient_checkpointing = True
    >>> round(activation_bytes(cfg, 576, 30) / GIB, 2)
    0.21
    """
    tokens, scale = micro_batch_tokens(cfg), weight_bytes(cfg) / 2
    layer = ACTIVATION_BYTES * scale * tokens * hidden
    if cfg.learner.gradient_checkpointing:
        return layers * tokens * hidden * weight_bytes(cfg) + layer
    return layers * layer


def memory_need(cfg: Config, params: int, activations: float = 0.0) -> dict[str, float]:
    """Bytes each role needs in all, an upper-bound estimate; ``activations``: a learner rank's
    (:func:`activation_bytes`; 0 counts the state alone).

    The defaults (2 engines with 1 GiB of KV cache, 2 ZeRO-0 ranks, fp32, KL on) for 1e9 parameters
    (3.73 GiB in fp32): engines 2 x (0.9 + 1 + 3.73) = 11.25 GiB; a rank holds weights + gradients
    (7.45), Adam's two moments (7.45) and the reference (3.73) beside its 0.7: 2 x 19.33 = 38.65 GiB.

    >>> from rlsys.config import load_config
    >>> need = memory_need(load_config(None), 10**9)
    >>> round(need["generators"] / GIB, 2), round(need["learners"] / GIB, 2)
    (11.25, 38.65)
    """
    engines = cfg.generator.num_engines * (ENGINE_BASE + cfg.generator.kv_cache_gib * GIB + params * weight_bytes(cfg))
    per_rank = LEARNER_BASE + rank_state(cfg, params, partitioned=False) + activations
    return {"generators": engines, "learners": cfg.learner.num_ranks * per_rank,
            "reward workers": cfg.reward.num_workers * REWARD_BASE}


def weight_bytes(cfg: Config) -> int:
    return 2 if cfg.model.dtype == "bfloat16" else 4


def rank_state(cfg: Config, params: int, partitioned: bool) -> float:
    """One learner rank's model state, bytes: its weights and gradients; fp32 Adam moments (and
    bf16's fp32 master copy), split over the ranks from ZeRO-1 on; a frozen reference copy when
    the KL term is on. partitioned: also split ZeRO-2's gradients and ZeRO-3's weights and
    reference over the ranks (the GPU count; the host count keeps its earlier, larger figure)."""
    weight, ranks, stage = weight_bytes(cfg), cfg.learner.num_ranks, cfg.learner.zero_stage

    def split(from_stage: int) -> int:
        return ranks if stage >= from_stage else 1

    optimizer = params * 4 * (2 + (weight == 2)) / split(1)
    weights = params * weight / (split(3) if partitioned else 1)
    grads = params * weight / (split(2) if partitioned else 1)
    return weights + grads + optimizer + (weights if cfg.algo.beta > 0 else 0)


def on_gpus(cfg: Config, gpus: list[tuple[int, int]]) -> bool:
    """Whether the local cluster's actors are placed on GPUs: the backend's choice
    (rlsys.cluster.placement.resolve_backend), for a local cluster whose GPUs are this machine's."""
    return cfg.cluster.backend == "nccl" or (cfg.cluster.backend == "auto" and len(gpus) > 0)


def gpu_need(cfg: Config, params: int, gpu_total: int, activations: float = 0.0) -> list[tuple[str, float]]:
    """(what, bytes) for each GPU the run takes, on GPUs of `gpu_total` bytes; ``activations``: a
    learner rank's, beside its state.

    2 ZeRO-1 ranks in bf16 without KL, 2 engines, for 1e9 parameters on 80 GiB GPUs: a rank holds
    weights 2e9 + gradients 2e9 + (Adam 8e9 + fp32 master 4e9) / 2 = 10e9 bytes (9.31 GiB); an
    engine 0.9 x 80 = 72 GiB (cluster.placement any).

    >>> from rlsys.config import load_config
    >>> cfg = load_config(None, ["model.dtype=bfloat16", "learner.zero_stage=1", "algo.beta=0"])
    >>> [(what, round(b / GIB, 2)) for what, b in gpu_need(cfg, 10**9, 80 * GIB)]
    [('learner rank 0', 9.31), ('learner rank 1', 9.31), ('generator 0', 72.0), ('generator 1', 72.0)]
    """
    state = rank_state(cfg, params, partitioned=True) + activations
    vllm = engine_memory_share(cfg) * gpu_total
    ranks, engines, tp = cfg.learner.num_ranks, cfg.generator.num_engines, cfg.generator.tensor_parallel_size
    if cfg.cluster.placement == "colocated":  # generator i on learner rank i's GPU
        return [(f"learner rank {i} + generator {i}", state + vllm) for i in range(ranks)]
    return ([(f"learner rank {i}", state) for i in range(ranks)]
            + [(f"generator {i}" + (f" GPU {j}" if tp > 1 else ""), vllm) for i in range(engines) for j in range(tp)])


def check_fits(cfg: Config, params: int, available: int, gpus: list[tuple[int, int]] | None = None,
               shape: tuple[int, int] | None = None) -> None:
    """Stop with the numbers when the estimate exceeds the memory this machine has available:
    `available` bytes of host memory, `gpus` (free, total) bytes per GPU the local cluster gets
    (None or []: none), `shape` the model's (hidden size, layers) for the learners' activations
    (None: not counted). On GPUs the model's state and the activations are counted per GPU and the
    host holds the processes alone."""
    gpus = gpus or []
    cfg = on_device(cfg, on_gpus(cfg, gpus))  # model.dtype=auto counted as the actors will run it
    activations = activation_bytes(cfg, *shape) if shape is not None else 0.0
    if on_gpus(cfg, gpus):
        check_gpus(cfg, params, gpus, activations)
        need = {"generators": cfg.generator.num_engines * ENGINE_BASE, "learners": cfg.learner.num_ranks * LEARNER_BASE,
                "reward workers": cfg.reward.num_workers * REWARD_BASE}
        what = "their processes; the model's state is on the GPUs"
    else:
        need = memory_need(cfg, params, activations)
        what = (f"generator.num_engines={cfg.generator.num_engines} x (engine + generator.kv_cache_gib="
                f"{cfg.generator.kv_cache_gib} + the model)")
        if activations:
            what += (f"; a learner rank's activations {activations / GIB:.1f} GiB for {micro_batch_tokens(cfg)} tokens "
                     f"a micro-batch (learner.max_tokens_per_micro_batch, learner.micro_batch_size, "
                     f"generator.max_model_len; learner.gradient_checkpointing="
                     f"{str(cfg.learner.gradient_checkpointing).lower()})")
    total = sum(need.values())
    if total > available:
        parts = ", ".join(f"{role} {b / GIB:.1f} GiB" for role, b in need.items())
        raise ConfigError(
            f"this run needs about {total / GIB:.1f} GiB of memory on this machine ({parts}: {what}, "
            f"learner.num_ranks={cfg.learner.num_ranks}, reward.num_workers={cfg.reward.num_workers}; "
            f"{params / 1e6:.1f}M parameters), and {available / GIB:.1f} GiB is available: it would thrash. Use fewer "
            f"engines or ranks, a smaller KV cache, or a cluster (cluster.address)")


def check_gpus(cfg: Config, params: int, gpus: list[tuple[int, int]], activations: float = 0.0) -> None:
    """Each GPU the run takes holds what is placed on it, on the GPUs with the most free memory
    (Ray does not choose by memory: a GPU that another process fills may still be given, and
    then that actor fails at start)."""
    if not gpus:
        raise ConfigError(f"cluster.backend={cfg.cluster.backend} places the actors on GPUs, and this machine has none "
                          f"that the local Ray cluster would get: use cluster.backend=auto or gloo")
    gpu_total = min(total for _, total in gpus)
    needs = gpu_need(cfg, params, gpu_total, activations)
    if len(needs) > len(gpus):
        raise ConfigError(
            f"this run takes {len(needs)} GPUs (learner.num_ranks={cfg.learner.num_ranks}, generator.num_engines="
            f"{cfg.generator.num_engines} x generator.tensor_parallel_size={cfg.generator.tensor_parallel_size}, "
            f"cluster.placement={cfg.cluster.placement}) and this machine has {len(gpus)}: the actors would wait "
            f"for GPUs until cluster.placement_timeout_s. Use fewer engines or ranks, or a cluster (cluster.address)")
    shard = params * weight_bytes(cfg) / cfg.generator.tensor_parallel_size
    if shard >= engine_memory_share(cfg) * gpu_total:
        raise ConfigError(
            f"the model's weights take {shard / GIB:.1f} GiB on each of an engine's GPUs ({params / 1e6:.1f}M "
            f"parameters, model.dtype={cfg.model.dtype}, generator.tensor_parallel_size="
            f"{cfg.generator.tensor_parallel_size}), and vLLM may use {engine_memory_share(cfg):.2f} x "
            f"{gpu_total / GIB:.1f} GiB of each (generator.gpu_memory_utilization): no room is left for a KV cache. "
            f"Raise generator.tensor_parallel_size or generator.gpu_memory_utilization")
    free = sorted((f for f, _ in gpus), reverse=True)
    for (what, need), has in zip(sorted(needs, key=lambda n: -n[1]), free):
        if need > has:
            raise ConfigError(
                f"{what} needs about {need / GIB:.1f} GiB of GPU memory, and the GPU left for it has {has / GIB:.1f} "
                f"GiB free (of {gpu_total / GIB:.1f}): {gpu_parts(cfg, params, gpu_total, activations)}. It would "
                f"run out of GPU "
                f"memory. Use learner.zero_stage 1-3 with more ranks, model.dtype=bfloat16, a smaller "
                f"generator.gpu_memory_utilization, or a cluster (cluster.address)")


def gpu_parts(cfg: Config, params: int, gpu_total: int, activations: float = 0.0) -> str:
    """What each kind of GPU holds, in words with the keys that set it."""
    learner = (f"a learner rank holds {rank_state(cfg, params, partitioned=True) / GIB:.1f} GiB (weights, gradients, "
               f"optimizer{', reference' if cfg.algo.beta > 0 else ''}; model.dtype={cfg.model.dtype}, "
               f"learner.zero_stage={cfg.learner.zero_stage} over learner.num_ranks={cfg.learner.num_ranks}, "
               f"{params / 1e6:.1f}M parameters)"
               + (f" and {activations / GIB:.1f} GiB of activations ({micro_batch_tokens(cfg)} tokens a micro-batch)"
                  if activations else ""))
    engine = (f"an engine takes generator.gpu_memory_utilization={engine_memory_share(cfg):.2f} of its GPU for "
              f"weights and KV cache")
    where = " on the same GPU (cluster.placement=colocated)" if cfg.cluster.placement == "colocated" else ""
    return f"{learner}, {engine}{where}"


def local_gpus() -> list[tuple[int, int]]:
    """(free, total) bytes of each NVIDIA GPU the local Ray cluster would get: the ones NVML lists,
    cut to CUDA_VISIBLE_DEVICES (indices or UUIDs) when it is set, as Ray counts them. NVML read
    through Ray's own copy of pynvml; no CUDA context is created in the driver (one would hold
    GPU memory for the whole run). No NVIDIA driver: none, as for Ray."""
    import ray._private.thirdparty.pynvml as nvml

    try:
        nvml.nvmlInit()
    except nvml.NVMLError:  # no driver or no GPU: Ray's local cluster counts none either (the same call)
        return []
    try:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is None:
            ids = [str(i) for i in range(nvml.nvmlDeviceGetCount())]
        elif visible in ("", "NoDevFiles"):
            ids = []
        else:
            ids = [v.strip() for v in visible.split(",")]
        out = []
        for id_ in ids:
            handle = (nvml.nvmlDeviceGetHandleByIndex(int(id_)) if id_.isdigit()
                      else nvml.nvmlDeviceGetHandleByUUID(id_))
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            out.append((int(memory.free), int(memory.total)))
        return out
    finally:
        nvml.nvmlShutdown()


def check_local_run(cfg: Config, model_path: str) -> None:
    """The preflight of a run on a local cluster: this machine's host memory and GPUs against the
    run's estimate, or a printed line saying why it is skipped (a model that is not a local folder)."""
    import psutil

    if not Path(model_path).is_dir():
        print(f"[rlsys] memory check skipped: model {model_path} is not a local folder (a hub id: the actors resolve "
              f"it on their nodes, and its size is not known here)", flush=True)
        return
    check_fits(cfg, model_params(model_path), psutil.virtual_memory().available, local_gpus(), model_shape(model_path))
