"""Model FLOPs of a decoder-only transformer, for MFU (model FLOPs utilisation).

Counted the usual way (Kaplan et al. 2020, PaLM appendix B): a multiply-add is 2 FLOPs; only
matrix products count (norms, activations, softmax and the embedding lookup are left out); the
backward pass costs twice the forward. Attention scores (QK^T and AV) are counted for the causal
context each position actually attends to, so lengths matter, not just parameter counts.

A GRPO learner step on a rollout batch does, per token:
- one forward without grad for the old log-probs (and one for the reference model when beta > 0),
- per epoch, one forward + backward (3 forwards' worth).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    gated_mlp: bool = True  # Llama/Qwen2: gate, up and down projections; GPT-2 style: up and down

    @classmethod
    def of(cls, config) -> "Shape":
        """From a transformers PretrainedConfig (Llama, Qwen2, Mistral, ... field names)."""
        heads = config.num_attention_heads
        return cls(hidden=config.hidden_size, layers=config.num_hidden_layers, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                   intermediate=config.intermediate_size, vocab=config.vocab_size)

    @property
    def matmul_params(self) -> int:
        """Weights that multiply every token's activations once per forward (lm_head included)."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = h * q + 2 * h * kv + q * h                      # q, k, v, o projections
        mlp = (3 if self.gated_mlp else 2) * h * self.intermediate
        return self.layers * (attention + mlp) + h * self.vocab


def forward_flops(shape: Shape, seq_len: int, logits: int | None = None) -> int:
    """One forward pass over one causal sequence of seq_len tokens, with the output layer applied
    at `logits` positions (default: all; the learner needs them only where it scores a token).

    Position t (0-based) attends to t + 1 positions: QK^T and AV cost 2 * 2 * heads * head_dim
    FLOPs per attended position, per layer.
    """
    head = shape.hidden * shape.vocab
    dense = 2 * (shape.matmul_params - head) * seq_len + 2 * head * (seq_len if logits is None else logits)
    attended = seq_len * (seq_len + 1) // 2                                 # sum over t of (t + 1)
    attention = shape.layers * 4 * shape.heads * shape.head_dim * attended
    return dense + attention


def padded_forward_flops(shape: Shape, sequences: int, length: int, pairs: int | None = None) -> int:
    """A forward over `sequences` sequences padded to `length` under an explicit attention mask,
    as the learner runs a micro-batch: attention over every (query, key) pair (SDPA applies a 4-D
    mask densely) or over `pairs` (query, key) pairs where the attention goes block by block
    (rlsys.math.prefix.prefix_attention), the output layer left out (every layout scores the same tokens).

    >>> padded_forward_flops(Shape(8, 1, 1, 1, 8, 16, 10), sequences=2, length=3)  # 2*(64*4+384)*6 + 4*8*18
    8256
    >>> padded_forward_flops(Shape(8, 1, 1, 1, 8, 16, 10), sequences=2, length=3, pairs=10)  # 2*640*6 + 4*8*10
    8000
    """
    body = 2 * (shape.matmul_params - shape.hidden * shape.vocab) * sequences * length
    attention = shape.layers * 4 * shape.heads * shape.head_dim * (sequences * length * length if pairs is None
                                                                    else pairs)
    return body + attention


def grpo_step_flops(shape: Shape, seq_lens: list[int], epochs: int = 1, reference: bool = False,
                    response_lens: list[int] | None = None, old_logprob_pass: bool = True) -> int:
    """Model FLOPs of one learner update on a rollout batch of sequences (prompt + response).

    response_lens: the output layer counts only where a response token is scored (what the
    learner computes); None counts it everywhere. old_logprob_pass=False: the update skipped the
    separate no-grad pass (one epoch over one mini-batch, see Learner.needs_old_logprobs)."""
    forwards = int(old_logprob_pass) + int(reference) + 3 * epochs
    logits = response_lens or [None] * len(seq_lens)
    return forwards * sum(forward_flops(shape, n, k) for n, k in zip(seq_lens, logits))


def mfu(flops: float, seconds: float, peak_flops_per_s: float) -> float:
    """Achieved model FLOP/s over the hardware's peak."""
    return flops / seconds / peak_flops_per_s
