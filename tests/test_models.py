"""Tests for rlsys.data.models: the char-level tiny tokenizer and the cached, deterministic tiny model."""
import dataclasses
import shutil
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
    with pytest.raises(RuntimeError, match=r"the copy node \S+ (\(\S+\) )?built .* differs from the driver's"):
        source.local()


def test_a_model_folder_missing_on_the_driver_is_named(tmp_path):
    missing = str(tmp_path / "only-in-the-config")
    with pytest.raises(FileNotFoundError, match="only-in-the-config: no such folder on the driver's node"):
        models.ModelSource.of(ModelConfig(path=missing), missing)
    hub = "Qwen/Qwen2.5-0.5B"
    assert models.ModelSource.of(ModelConfig(path=hub), hub).local() == hub


# ---------------------------------------------------------------- local folders streamed to the nodes

@pytest.fixture
def checkpoint(tmp_path, tiny_dir):
    """A checkpoint folder as rlsys writes one: the HF files, learner state, trainer state, checksums.json."""
    from rlsys.checkpoint import write_checksums

    folder = tmp_path / "run" / "checkpoints" / "step_3"
    shutil.copytree(tiny_dir, folder)
    (folder / "learner").mkdir()
    (folder / "learner" / "rank_0.safetensors").write_bytes(b"optimizer state" * 100)
    (folder / "trainer_state.json").write_text("{}")
    write_checksums(folder)
    return folder


def away(source, tmp_path):
    """The source as an actor on a node without the driver's disk sees it: its path is not there."""
    return dataclasses.replace(source, path=str(tmp_path / "not-on-this-node" / "step_3"))


def test_a_checkpoints_digest_comes_from_its_checksums_and_equals_hashing_every_file(checkpoint):
    from_checksums = models.model_files(checkpoint)
    (checkpoint / "checksums.json").unlink()
    assert models.model_files(checkpoint) == from_checksums  # hashed this time
    assert sorted(from_checksums) == sorted(p.name for p in checkpoint.iterdir() if p.is_file()
                                            and p.name != "trainer_state.json")  # learner/ is not streamed


def test_a_checkpoint_file_cut_short_or_missing_is_named(checkpoint):
    with open(checkpoint / "config.json", "a") as f:
        f.write(" ")
    with pytest.raises(ValueError, match=r"step_3: config.json has \d+ bytes, its checksums.json recorded"):
        models.model_files(checkpoint)
    (checkpoint / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="step_3: config.json listed in its checksums.json but missing"):
        models.model_files(checkpoint)


def test_a_folder_streams_into_a_fresh_cache_once_and_equals_the_drivers(ray_cluster, checkpoint, tmp_path,
                                                                        monkeypatch, capsys):
    monkeypatch.setattr(models, "CHUNK_BYTES", 4096)  # many chunks per file, IN_FLIGHT of them requested
    source = models.ModelSource.of(ModelConfig(path=str(checkpoint)), str(checkpoint))
    assert source.reader is not None and source.digest == models.listing_digest(models.model_files(checkpoint))
    monkeypatch.setenv("RLSYS_CACHE", str(tmp_path / "node-cache"))
    assert source.local() == str(checkpoint)  # the path holds the same files here: shared storage, nothing copied
    assert not (tmp_path / "node-cache").exists()
    node = away(source, tmp_path)
    got = Path(node.local())
    assert got == tmp_path / "node-cache" / "models" / source.digest
    assert models.listing_digest(models.model_files(got)) == source.digest
    assert all((got / n).read_bytes() == (checkpoint / n).read_bytes() for n, _, _ in source.files)
    assert not (got / "learner").exists() and not (got / "trainer_state.json").exists()
    again = node.local()
    assert again == str(got)
    assert capsys.readouterr().out.count(": fetching ") == 1  # the second start found the node's copy


def test_actors_starting_at_once_on_one_node_fetch_once(ray_cluster, checkpoint, tmp_path, monkeypatch, capsys):
    from concurrent.futures import ThreadPoolExecutor

    node = away(models.ModelSource.of(ModelConfig(path=str(checkpoint)), str(checkpoint)), tmp_path)
    monkeypatch.setenv("RLSYS_CACHE", str(tmp_path / "node-cache"))
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: node.local(), range(3)))
    assert len(set(paths)) == 1
    assert capsys.readouterr().out.count(": fetching ") == 1


def test_a_damaged_cached_copy_is_refused_and_fetched_again(ray_cluster, checkpoint, tmp_path, monkeypatch, capsys):
    node = away(models.ModelSource.of(ModelConfig(path=str(checkpoint)), str(checkpoint)), tmp_path)
    monkeypatch.setenv("RLSYS_CACHE", str(tmp_path / "node-cache"))
    got = Path(node.local())
    weights_file = got / "model.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[-1] ^= 0xFF  # altered in place, same size
    weights_file.write_bytes(bytes(data))
    assert node.local() == str(got)
    assert weights_file.read_bytes() == (checkpoint / "model.safetensors").read_bytes()
    (got / "config.json").write_text("{}")  # cut short
    assert node.local() == str(got) and (got / "config.json").read_bytes() == (checkpoint / "config.json").read_bytes()
    out = capsys.readouterr().out
    assert out.count("was cut short or altered") == 2 and out.count(": fetching ") == 3


def test_a_different_folder_at_the_same_path_on_a_node_is_not_used(ray_cluster, checkpoint, tmp_path, monkeypatch):
    source = models.ModelSource.of(ModelConfig(path=str(checkpoint)), str(checkpoint))
    other = tmp_path / "other" / "step_3"  # another run's step_3 at the path, on this node
    shutil.copytree(checkpoint, other)
    (other / "config.json").write_text('{"another": "model"}')
    (other / "checksums.json").unlink()
    monkeypatch.setenv("RLSYS_CACHE", str(tmp_path / "node-cache"))
    got = dataclasses.replace(source, path=str(other)).local()
    assert got == str(tmp_path / "node-cache" / "models" / source.digest)


def test_a_folder_a_node_cannot_get_is_named_with_the_node(checkpoint, tmp_path, monkeypatch):
    source = models.ModelSource.of(ModelConfig(path=str(checkpoint)), str(checkpoint))
    source = dataclasses.replace(source, reader=None)  # as made where Ray was not running: no reader
    assert source.local() == str(checkpoint)
    monkeypatch.setenv("RLSYS_CACHE", str(tmp_path / "node-cache"))
    named = r"node \S+.*: model folder \S+not-on-this-node/step_3 .*is not on this node"
    with pytest.raises(FileNotFoundError, match=named):
        away(source, tmp_path).local()


def test_a_file_changed_on_the_driver_after_launch_is_named(ray_cluster, checkpoint, tmp_path, monkeypatch):
    node = away(models.ModelSource.of(ModelConfig(path=str(checkpoint)), str(checkpoint)), tmp_path)
    (checkpoint / "config.json").write_text((checkpoint / "config.json").read_text().replace('"', "'"))  # same size
    monkeypatch.setenv("RLSYS_CACHE", str(tmp_path / "node-cache"))
    with pytest.raises(RuntimeError, match="config.json arrived with sha256 .* the file changed on the driver's node"):
        node.local()
    assert not list((tmp_path / "node-cache" / "models").iterdir())[1:]  # no half-written copy left but the lock


def test_a_cached_model_that_is_not_the_configs_recipe_is_streamed_not_rebuilt(ray_cluster, tmp_path, monkeypatch):
    """model.path=tiny in the config, a pipeline stage sampling another model of the cache (a tiny of
    another seed, a converted GGUF): the nodes must get that folder, not build the config's tiny."""
    monkeypatch.setenv("RLSYS_CACHE", str(tmp_path / "driver-cache"))
    other = resolve_model(ModelConfig(path="tiny", tiny_seed=7))
    source = models.ModelSource.of(ModelConfig(path="tiny"), other)
    assert source.build is None and source.digest == models.listing_digest(models.model_files(Path(other)))
