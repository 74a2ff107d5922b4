"""State trees without pickle: a tree of dicts, lists, tuples, sets, numbers, strings, tensors and
a few allowlisted classes, written as a JSON file (the structure) plus a safetensors file (the
tensors). Loading one builds nothing but those types, so a checkpoint cannot run code.

The learner's DeepSpeed state goes through this (SafetensorsCheckpointEngine): DeepSpeed keeps its
file names (its loader looks them up), each holding the JSON, with the tensors in
`<name>.safetensors` beside it.
"""

from __future__ import annotations

import enum
import functools
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

TENSORS = ".safetensors"


@functools.cache
def allowed_classes() -> dict[str, type]:
    """The classes DeepSpeed puts into its state files, by "module:name": the only ones a load builds."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return {f"{c.__module__}:{c.__qualname__}": c
            for c in (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)}


def encode(tree: Any, tensors: dict[str, torch.Tensor], where: str = "") -> Any:
    """The JSON form of `tree`; its tensors go into `tensors` (copied: safetensors wants each in
    storage of its own, and DeepSpeed's live buffers must not be aliased)."""
    if tree is None or isinstance(tree, (bool, int, float, str)) and not isinstance(tree, enum.Enum):
        return tree
    if isinstance(tree, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = tree.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(tree, torch.Size):
        return {"__size__": list(tree)}
    if isinstance(tree, torch.dtype):
        return {"__dtype__": str(tree).removeprefix("torch.")}
    if isinstance(tree, tuple):
        return {"__tuple__": [encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(tree)]}
    if isinstance(tree, list):
        return [encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(tree)]
    if isinstance(tree, (set, frozenset)):
        return {"__set__": [encode(v, tensors, where) for v in sorted(tree, key=repr)]}
    if isinstance(tree, dict):
        pairs = [[encode(k, tensors, where), encode(v, tensors, f"{where}/{k}")] for k, v in tree.items()]
        plain = type(tree) is dict and all(isinstance(k, str) and not k.startswith("__") for k in tree)
        return {k: v for k, v in pairs} if plain else {
            "__odict__" if isinstance(tree, OrderedDict) else "__dict__": pairs}
    name = f"{type(tree).__module__}:{type(tree).__qualname__}"
    if name not in allowed_classes():
        raise TypeError(f"state at {where or '/'}: {name} is not a type a checkpoint may hold")
    if isinstance(tree, enum.Enum):
        return {"__enum__": name, "value": tree.value}
    return {"__object__": name, "state": encode(vars(tree), tensors, where)}


def decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if "__tensor__" in node:
        return tensors[node["__tensor__"]]
    if "__size__" in node:
        return torch.Size(node["__size__"])
    if "__dtype__" in node:
        dtype = getattr(torch, str(node["__dtype__"]), None)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"a checkpoint names dtype {node['__dtype__']!r}, which is not a torch dtype")
        return dtype
    if "__tuple__" in node:
        return tuple(decode(v, tensors) for v in node["__tuple__"])
    if "__set__" in node:
        return {decode(v, tensors) for v in node["__set__"]}
    if "__dict__" in node or "__odict__" in node:
        pairs = [(decode(k, tensors), decode(v, tensors)) for k, v in node.get("__dict__", node.get("__odict__"))]
        return OrderedDict(pairs) if "__odict__" in node else dict(pairs)
    if "__enum__" in node:
        return _allowed(node["__enum__"])(node["value"])
    if "__object__" in node:
        obj = object.__new__(_allowed(node["__object__"]))
        obj.__dict__.update(decode(node["state"], tensors))  # no __init__, no __setstate__: data only
        return obj
    return {k: decode(v, tensors) for k, v in node.items()}


def _allowed(name: str) -> type:
    classes = allowed_classes()
    if name not in classes:
        raise TypeError(f"a checkpoint names class {name}, which it may not hold")
    return classes[name]


def save(tree: Any, path: str | Path) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    structure = encode(tree, tensors)
    save_file(tensors, f"{path}{TENSORS}")
    Path(path).write_text(json.dumps(structure))


def load(path: str | Path, map_location=None) -> Any:
    from safetensors.torch import load_file

    device = "cpu" if map_location is None or callable(map_location) else str(torch.device(map_location))
    try:
        structure = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a state file rlsys wrote (JSON beside {Path(path).name}{TENSORS}): "
                         f"{type(e).__name__}: {e}") from None
    if not Path(f"{path}{TENSORS}").is_file():
        raise FileNotFoundError(f"{path}{TENSORS}: missing; the state file {path} needs its tensors")
    return decode(structure, load_file(f"{path}{TENSORS}", device=device))


class SafetensorsCheckpointEngine:
    """Wraps DeepSpeed's checkpoint engine: its saves and loads go through `save`/`load` above
    (DeepSpeed's own pickles with torch.save and loads with weights_only=False); everything else
    (folders, commit) is the wrapped engine's."""

    def __init__(self, inner):
        self.inner = inner

    def save(self, state_dict, path: str) -> None:
        save(state_dict, path)

    def load(self, path: str, map_location=None):
        return load(path, map_location)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)
