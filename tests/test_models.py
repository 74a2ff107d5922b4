"""Tests for rlsys.data.models: the char-level tiny tokenizer and the cached, deterministic tiny model."""
import string
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import rlsys.data.models as models
from rlsys.config import ModelConfig
from rlsys.data.models import EOS, THINK_TAGS, build_tiny_tokenizer, resolve_model

TEXT = "<think>12 + 30 = 42\nso\tthe sum is 42.</think> <answer>42</answer>"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return Path(resolve_model(ModelConfig(path="tiny"), cache_dir=tmp_path_factory.mktemp("cache")))


def weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


# ---------------------------------------------------------------- tokenizer

def test_tags_are_one_token_each():
    tok = build_tiny_tokenizer()
    ids = [tok.encode(tag, add_special_tokens=False) for tag in THINK_TAGS]
    assert all(len(i) == 1 for i in ids), ids
    assert len({i[0] for i in ids}) == 4
    assert [i[0] for i in ids] == [tok.convert_tokens_to_ids(t) for t in THINK_TAGS]


def test_tokenizer_is_character_level_and_round_trips():
    tok = build_tiny_tokenizer()
    ids = tok.encode(TEXT, add_special_tokens=False)
    # 4 tags, and every other character of the text is one token
    plain = TEXT
    for tag in THINK_TAGS:
        plain = plain.replace(tag, "")
    assert len(ids) == 4 + len(plain)
    assert tok.decode(ids) == TEXT
    digits = tok.encode("0123456789", add_special_tokens=False)
    assert len(set(digits)) == 10 and tok.decode(digits) == "0123456789"
    assert tok.encode("  ", add_special_tokens=False) == [tok.encode(" ", add_special_tokens=False)[0]] * 2


def test_every_printable_character_is_its_own_token():
    tok = build_tiny_tokenizer()
    ids = [tok.encode(c, add_special_tokens=False) for c in string.printable]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == len(string.printable)
    assert tok.decode(sum(ids, [])) == string.printable


def test_special_tokens():
    tok = build_tiny_tokenizer()
    assert tok.eos_token == EOS and tok.pad_token == EOS and tok.pad_token_id == tok.eos_token_id
    assert len(tok) == 4 + len(string.printable) + 4  # specials + printable ASCII + tags


# ---------------------------------------------------------------- resolve_model("tiny")

def test_tiny_model_is_cached_and_not_rebuilt(tmp_path, monkeypatch):
    first = resolve_model(ModelConfig(path="tiny"), cache_dir=tmp_path)
    assert Path(first).parent == tmp_path and Path(first).name.startswith("tiny-")
    files = {p.name: p.stat().st_mtime_ns for p in Path(first).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached tiny model was rebuilt")

    monkeypatch.setattr(models, "build_tiny_model", no_rebuild)
    second = resolve_model(ModelConfig(path="tiny"), cache_dir=tmp_path)
    assert second == first
    assert {p.name: p.stat().st_mtime_ns for p in Path(second).iterdir()} == files
    assert [p.name for p in tmp_path.iterdir()] == [Path(first).name], "no temporary folder is left behind"


def test_tiny_builds_are_bit_identical_and_depend_on_the_seed(tmp_path, tiny_dir):
    again = resolve_model(ModelConfig(path="tiny"), cache_dir=tmp_path / "b")
    assert Path(again).name == tiny_dir.name
    a, b = weights(tiny_dir), weights(again)
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)

    other = resolve_model(ModelConfig(path="tiny", tiny_seed=1), cache_dir=tmp_path / "b")
    assert other != again, "a different seed is a different cache entry"
    c = weights(other)
    assert not all(torch.equal(a[k], c[k]) for k in a), "the seed does not change the weights"


def test_lost_race_keeps_the_finished_build(tmp_path, monkeypatch):
    """Another process renames its identical build into place first: ours is discarded, theirs returned."""
    real_build = models.build_tiny_model
    target = {}

    def build_while_another_finishes(out, **spec):
        real_build(out, **spec)
        theirs = Path(out).parent / Path(out).name[1:].rsplit("-", 1)[0]  # ".tiny-<key>-xyz" -> "tiny-<key>"
        real_build(theirs, **spec)
        target["path"] = theirs

    monkeypatch.setattr(models, "build_tiny_model", build_while_another_finishes)
    got = resolve_model(ModelConfig(path="tiny"), cache_dir=tmp_path)
    assert Path(got) == target["path"]
    assert [p.name for p in tmp_path.iterdir()] == [target["path"].name], "our temporary build is removed"


def test_tiny_folder_loads_with_transformers(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert model.config.model_type == "qwen2"
    assert model.config.vocab_size == len(tok) == len(build_tiny_tokenizer())
    assert next(model.parameters()).dtype == torch.float32
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids(EOS)
    assert model.config.eos_token_id == tok.eos_token_id

    # what the trainer and vLLM load must tokenize exactly like the tokenizer built in code
    ids = build_tiny_tokenizer().encode(TEXT, add_special_tokens=False)
    assert tok.encode(TEXT, add_special_tokens=False) == ids
    assert tok.decode(ids) == TEXT
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True) \
        == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tok))
    assert torch.isfinite(logits).all()


# ---------------------------------------------------------------- other model paths

def test_folder_without_config_is_refused_by_name(tmp_path):
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="not_a_model"):
        resolve_model(ModelConfig(path=str(folder)))


def test_local_model_folder_is_returned_as_is(tiny_dir):
    assert resolve_model(ModelConfig(path=str(tiny_dir))) == str(tiny_dir)


def test_hub_id_passes_through(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_model(ModelConfig(path="Qwen/Qwen2.5-0.5B")) == "Qwen/Qwen2.5-0.5B"


def test_a_built_model_is_rebuilt_on_each_node_and_checked_against_the_drivers(tmp_path, monkeypatch):
    """Nodes share no disk: the actor's node builds its own copy from the recipe, bit for bit the
    driver's (the digest says so); a node that builds something else stops, naming both digests."""
    cfg = ModelConfig(path="tiny")
    monkeypatch.setenv("RLSYS_CACHE", str(tmp_path / "driver-cache"))
    driver = resolve_model(cfg)
    source = models.ModelSource.of(cfg, driver)
    assert source.build == cfg and source.digest == models.folder_digest(Path(driver))
    monkeypatch.setenv("RLSYS_CACHE", str(tmp_path / "node-cache"))  # another node's home
    on_node = source.local()
    assert Path(on_node).parent == tmp_path / "node-cache" and models.folder_digest(Path(on_node)) == source.digest
    with open(Path(on_node) / "config.json", "a") as f:  # another package version would build other bytes
        f.write(" ")
    with pytest.raises(RuntimeError, match=r"the copy node \S+ built .* differs from the driver's"):
        source.local()


def test_a_model_folder_the_node_lacks_is_named(tmp_path, tiny_dir):
    cfg = ModelConfig(path=str(tmp_path / "only-on-the-driver"))
    source = models.ModelSource.of(cfg, cfg.path)
    assert source.build is None
    with pytest.raises(FileNotFoundError, match="only-on-the-driver does not exist on node"):
        source.local()
    checkpoint = models.ModelSource.of(ModelConfig(path="tiny"), str(tiny_dir))  # not the cache's: a folder as given
    assert checkpoint.build is None and checkpoint.local() == str(tiny_dir)
