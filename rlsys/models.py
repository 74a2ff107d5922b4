"""Where a run's model comes from: a local HF folder, a hub id, or "tiny".

"tiny" is a small random Qwen2 with a character-level tokenizer built in code, so the whole
system runs with no download. It is built
deterministically from the config (same seed, same bytes) into a cache folder, written to a
temporary folder first and renamed, so a half-written model is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from rlsys.config import ModelConfig

THINK_TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
EOS = "<|endoftext|>"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def default_cache_dir() -> Path:
    return Path(os.environ.get("RLSYS_CACHE", Path.home() / ".cache" / "rlsys"))


def resolve_model(cfg: ModelConfig, cache_dir: Path | None = None) -> str:
    """A path (or hub id) that both transformers and vLLM can load."""
    if cfg.path != "tiny":
        local = Path(cfg.path).expanduser()
        if local.exists() and not (local / "config.json").is_file():
            raise FileNotFoundError(f"model.path={cfg.path}: folder has no config.json (not an HF model folder)")
        if not local.exists() and (cfg.path.startswith(("/", ".", "~")) or cfg.path.count("/") != 1):
            raise FileNotFoundError(f"model.path={cfg.path}: no such folder, and not a hub id (owner/name)")
        return str(local) if local.exists() else cfg.path  # a hub id, for clusters that reach a hub
    cache_dir = cache_dir or default_cache_dir()
    spec = {"seed": cfg.tiny_seed, "hidden": cfg.tiny_hidden, "layers": cfg.tiny_layers, "heads": cfg.tiny_heads,
            "version": 4}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    target = cache_dir / f"tiny-{key}"
    if (target / "model.safetensors").is_file():
        return str(target)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tiny-{key}-", dir=cache_dir))
    build_tiny_model(tmp, **{k: v for k, v in spec.items() if k != "version"})
    try:
        tmp.rename(target)
    except OSError:  # another process finished the same build first; theirs is identical
        shutil.rmtree(tmp)
    return str(target)


def build_tiny_tokenizer():
    """One token per printable ASCII character, plus the four R1 tags as single tokens.

    Character level on purpose: a random policy then emits a digit one token in ten, so the toy
    tasks start near (not at) zero reward and GRPO has a signal from the first step.
    """
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Byte-level symbols (space -> "Ġ") in a merge-free BPE: AutoTokenizer loads a qwen2 folder as
    # Qwen2Tokenizer, which rebuilds a byte-level BPE from vocab + merges; this vocab makes that rebuild
    # the same character-level tokenizer (a plain-character vocab would silently drop all whitespace).
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    chars = [byte_level.pre_tokenize_str(c)[0][0] for c in string.printable]
    specials = [EOS, "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.add_tokens(THINK_TAGS)  # plain added tokens: one id each, kept by decode
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, unk_token="<unk>",
                                   chat_template=CHATML)


def build_tiny_model(out: Path, seed: int, hidden: int, layers: int, heads: int) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tiny_tokenizer()
    eos = tokenizer.convert_tokens_to_ids(EOS)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=2048,
        tie_word_embeddings=False, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = eos
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
