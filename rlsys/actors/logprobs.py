"""The policy's log-probs, computed inside the model's forward (the learner's side of scoring).

The learner needs log p(token) of response tokens, never the logits: with_logprob_forward gives an
HF causal LM a forward that runs the output layer only where a response is scored, a chunk of
positions at a time (chunked_logprobs), on the shared-prompt layout when asked (PREFIX_ATTENTION).
Dropout is off (load_without_dropout): every forward of an update must score the same policy.
"""

from __future__ import annotations

import torch

from rlsys.math.prefix import prefix_attention


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits (B, L, V) at positions 0..L-1, input_ids (B, L) -> (B, L) log-prob of token t given < t.

    Column 0 (no prediction for the first token) is 0; it is never a response token.
    """
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)         # (B, L-1, V)
    picked = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)                    # (B, L-1)
    return torch.nn.functional.pad(picked, (1, 0))                                  # (B, L)


def with_logprob_forward(model: torch.nn.Module) -> torch.nn.Module:
    """Give the HF causal LM a forward that can return log-probs directly: called with
    `logprobs_of=targets (B, T)`, it runs the decoder over the whole input and the output layer
    only on positions scored_from .. L-2, `chunk` at a time (chunked_logprobs), and returns (B, T);
    given `source` (B, T) too (prompts shared, rlsys.math.prefix), the input is the shared layout
    and the output layer runs on the hidden states at those flat positions. Without logprobs_of,
    the model's own forward. The output layer runs inside the forward that DeepSpeed
    wraps (its gradient hooks and ZeRO-3 gathers see every use of a parameter in a step): a
    separate call to the output layer after the engine's forward loses its gradient under
    DeepSpeed's bf16 optimizer (measured: grad norm 2.39 instead of 2.89)."""
    own = model.forward
    if model.config._attn_implementation == "sdpa":  # the same SDPA, plus shared layouts by their blocks
        model.set_attn_implementation(register_prefix_attention())

    def forward(*args, logprobs_of=None, scored_from=0, temperature=1.0, chunk=0, source=None, prefix_blocks=None,
                **kwargs):
        if logprobs_of is None:
            return own(*args, **kwargs)
        if prefix_blocks is not None and model.config._attn_implementation == PREFIX_ATTENTION:
            kwargs["prefix_blocks"] = prefix_blocks  # reaches every layer's attention (the mask is then unused)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 4 and model.config._attn_implementation not in ("sdpa", PREFIX_ATTENTION):
            # A custom 4D mask reaches the attention as it is: SDPA takes booleans, eager adds it to the scores.
            kwargs["attention_mask"] = torch.zeros(mask.shape, dtype=model.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(model.dtype).min)
        hidden = model.base_model(*args, **kwargs).last_hidden_state                 # (B or S, L, H), final norm applied
        if source is not None:
            hidden = hidden.reshape(-1, hidden.shape[-1])[source]                    # (B, T, H)
            return chunked_logprobs(hidden, model.get_output_embeddings(), logprobs_of, temperature, chunk)
        return chunked_logprobs(hidden[:, scored_from:-1], model.get_output_embeddings(), logprobs_of,
                                temperature, chunk)                                   # (B, L - 1 - scored_from)

    model.forward = forward
    return model


PREFIX_ATTENTION = "rlsys_prefix"
"""The learner's attention implementation: HF's SDPA, except where a shared layout's blocks are
passed (prefix_blocks=): then rlsys.math.prefix.prefix_attention, which attends block by block
instead of applying the block mask densely."""


def register_prefix_attention() -> str:
    """Register PREFIX_ATTENTION with transformers (attention and mask functions); returns its name."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, prefix_blocks=None, **kwargs):
        if prefix_blocks is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                          **kwargs)
        assert dropout == 0.0, "prefix attention has no dropout (the learner loads models without it)"
        return prefix_attention(query, key, value, prefix_blocks, scaling), None

    AttentionInterface.register(PREFIX_ATTENTION, attention)
    AttentionMaskInterface.register(PREFIX_ATTENTION, sdpa_mask)
    return PREFIX_ATTENTION


def chunked_logprobs(hidden: torch.Tensor, output_layer: torch.nn.Module, targets: torch.Tensor,
                     temperature: float, chunk: int) -> torch.Tensor:
    """hidden (B, T, H) final hidden states, targets (B, T) the next tokens -> (B, T) log-probs of
    the targets under softmax(output_layer(hidden) / temperature), about `chunk` tokens (rows x
    positions) at a time.

    Each chunk's logits (B, c, V), c = chunk // B, live only inside it: with grad the chunk is recomputed in the
    backward pass (activation checkpointing), so neither pass ever holds a whole (B, T, V) tensor
    (at 8k tokens and a 152k vocabulary one fp32 copy is 5 GB a row). log p = logit - logsumexp,
    without a separate log-softmax copy."""

    def piece(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = output_layer(h).float()                                             # (B, c, V)
        if temperature != 1.0:  # a vocabulary-wide pass saved at the default temperature
            logits = logits / temperature
        return logits.gather(-1, t.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (B, c)

    pieces = []
    c = max(1, chunk // max(1, hidden.shape[0]))
    for i in range(0, hidden.shape[1], c):
        h, t = hidden[:, i:i + c], targets[:, i:i + c]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(torch.utils.checkpoint.checkpoint(piece, h, t, use_reentrant=False))
        else:
            pieces.append(piece(h, t))
    return torch.cat(pieces, dim=1) if pieces else hidden.new_zeros(hidden.shape[:2], dtype=torch.float32)


def generator_mismatch(gen_logprobs: torch.Tensor, learner_logprobs: torch.Tensor, mask: torch.Tensor
                       ) -> torch.Tensor:
    """How far the generators' policy is from the learner's on the sampled tokens, (B, T) each:
    [sum |learner - generator| log-prob, sum of k3 KL(generator || learner), tokens, max |diff|]
    over the mask. The tokens were sampled by the generator, so k3 with r = learner - generator
    (exp(r) - r - 1) estimates KL(generator || learner) without bias. Both sides are the tempered
    distribution (vLLM's processed log-probs, the learner's logits / temperature): the gap is a real
    mismatch (kernels, precision, stale weights), not the temperature.

    >>> g = torch.tensor([[0.0, -1.0, -2.0]]); l = torch.tensor([[0.0, -1.5, -2.0]]); m = torch.tensor([[0., 1., 1.]])
    >>> [round(v, 4) for v in generator_mismatch(g, l, m).tolist()]  # k3(-0.5) = exp(-0.5) + 0.5 - 1
    [0.5, 0.1065, 2.0, 0.5]
    """
    gen, learner, m = gen_logprobs.double(), learner_logprobs.double(), mask.double()      # (B, T)
    diff = (learner - gen) * m                                                             # (B, T)
    k3 = (torch.exp(diff) - diff - 1.0) * m                                                # (B, T)
    max_diff = diff.abs().max() if m.any() else torch.zeros((), dtype=torch.float64)
    return torch.stack([diff.abs().sum(), k3.sum(), m.sum(), max_diff])


def resolve_logprob_chunk(chunk: int | None, cuda: bool) -> int:
    """learner.logprob_chunk, or when None by the rank's device: 128 positions on CPUs (a chunk's
    fp32 logits stay under the size up to which malloc reuses freed memory: rlsys.actors.heap),
    1024 on GPUs (fewer, larger kernels; at a 152k vocabulary a chunk's fp32 logits are 0.6 GiB).

    >>> resolve_logprob_chunk(None, cuda=False), resolve_logprob_chunk(None, cuda=True), resolve_logprob_chunk(0, cuda=True)
    (128, 1024, 0)
    """
    if chunk is not None:
        return chunk
    return 1024 if cuda else 128


def scored_from(loss_mask: torch.Tensor) -> int:
    """The first position whose logits any row needs: one before the earliest response token."""
    scored = loss_mask.any(dim=0).nonzero()
    return max(0, int(scored[0]) - 1) if len(scored) else 0


def load_without_dropout(model_path: str, dtype):
    """The HF model with every dropout probability in its config set to 0 (attention, hidden,
    embedding, residual: the names differ by architecture), and any nn.Dropout left in the modules
    set to p=0. Dropout would make the training forward score another policy than the old-log-prob
    and reference passes (which run in eval mode) and than the generators."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    for key, value in config.to_dict().items():
        if ("dropout" in key or key.endswith("_pdrop")) and isinstance(value, float):
            setattr(config, key, 0.0)
    model = AutoModelForCausalLM.from_pretrained(model_path, config=config, dtype=dtype)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model
