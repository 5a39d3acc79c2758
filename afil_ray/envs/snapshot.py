"""Simulator state snapshots as bytes: a nested state dict flattened to ``a/b/c`` keys in safetensors format.

safetensors rather than pickle: snapshots live in the replay store for a long time and are read on other
machines, so they must be safe to load and independent of Python versions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    flat: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        if "/" in key:
            raise ValueError(f"state dict key {key!r} contains '/', which snapshots use as separator")
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, path + "/"))
        else:
            if hasattr(value, "detach"):
                value = value.detach().cpu().numpy()
            flat[path] = np.ascontiguousarray(value)
    return flat


def _unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def dumps(state: dict[str, Any]) -> bytes:
    return st_save(_flatten(state))


def loads(blob: bytes) -> dict[str, Any]:
    return _unflatten(st_load(blob))
