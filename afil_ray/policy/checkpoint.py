"""Policy checkpoints, one file per component, so that after an online update only the failure head ships.

```
<dir>/policy.yaml                 resolved PolicyConfig
<dir>/spec.json                   format, state_dim, action_dim, cameras
<dir>/backbone_config/            the VLM's transformers config (+ tokenizer files for a pretrained backbone)
<dir>/normalizer.json             normalisation statistics (float32 values, exact in JSON)
<dir>/backbone.safetensors
<dir>/success_head.safetensors
<dir>/failure_head.safetensors
<dir>/critic.safetensors          only when the policy has a success critic (policy.critic)
```

A checkpoint is self-contained: loading builds the architecture from ``backbone_config/`` and then reads the
weights, without touching ``policy.pretrained_path``. Files are written atomically (temporary + rename), so a
reader never sees half a component. Every problem raises :class:`CheckpointError` naming the file and the key.
Checkpoints written before critics existed have no ``critic`` key in ``policy.yaml``, so they load as policies
without a critic (``DAGPolicy.add_critic`` gives one a fresh critic).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from afil_ray.config import PolicyConfig
from afil_ray.policy.backbone import vlm_config_of
from afil_ray.policy.model import COMPONENTS, OPTIONAL_COMPONENTS, DAGPolicy
from afil_ray.policy.normalize import Normalizer
from afil_ray.policy.tokenizer import PretrainedTokenizer

FORMAT = 1
CONFIG_FILE = "policy.yaml"
SPEC_FILE = "spec.json"
BACKBONE_CONFIG_DIR = "backbone_config"
NORMALIZER_FILE = "normalizer.json"
# Keys that may differ between a checkpoint and the config that loads it: where weights first came from.
_NOT_ARCHITECTURE = ("pretrained_path", "failure_head_init")


class CheckpointError(RuntimeError):
    """A missing, corrupt or mismatching checkpoint; the message names the path and the key."""


def component_file(directory: str | Path, name: str) -> Path:
    if name not in COMPONENTS + OPTIONAL_COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS + OPTIONAL_COMPONENTS}, got {name!r}")
    return Path(directory) / f"{name}.safetensors"


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_component(policy: DAGPolicy, directory: str | Path, name: str) -> Path:
    """Write one component's weights (e.g. ``failure_head`` after an online update)."""
    path = component_file(directory, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in policy.component(name).state_dict().items()}
    _atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"component": name,
                                                                          "format": str(FORMAT)}))
    return path


def save_policy(policy: DAGPolicy, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(policy.config))
    _atomic_write(directory / CONFIG_FILE, lambda tmp: tmp.write_text(config_yaml))
    spec = {"format": FORMAT, "state_dim": policy.state_dim, "action_dim": policy.action_dim,
            "cameras": list(policy.cameras)}
    _atomic_write(directory / SPEC_FILE, lambda tmp: tmp.write_text(json.dumps(spec, indent=1)))
    policy.backbone.vlm.config.save_pretrained(str(directory / BACKBONE_CONFIG_DIR))
    if isinstance(policy.tokenizer, PretrainedTokenizer):
        policy.tokenizer.save_pretrained(directory / BACKBONE_CONFIG_DIR)
    _atomic_write(directory / NORMALIZER_FILE, policy.normalizer.save)
    for name in policy.components:
        save_component(policy, directory, name)
    return directory


def load_component_state(policy: DAGPolicy, name: str, state: Mapping[str, torch.Tensor],
                         source: str = "state dict") -> None:
    """Load one component's weights after checking every key and shape (also for weights sent in memory)."""
    if name in OPTIONAL_COMPONENTS and name not in policy.components:
        raise CheckpointError(f"{source}: carries a {name}, the policy has none (policy.{name}=false when it was "
                              "built)")
    module = policy.component(name)
    expected = module.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing:
        raise CheckpointError(f"{source}: {name} lacks key '{missing[0]}' ({len(missing)} missing)")
    if unexpected:
        raise CheckpointError(f"{source}: {name} has unexpected key '{unexpected[0]}' ({len(unexpected)} in all)")
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(f"{source}: {name} key '{key}' has shape {tuple(state[key].shape)}, the policy "
                                  f"expects {tuple(value.shape)}")
    module.load_state_dict(dict(state), strict=True)


def load_component(policy: DAGPolicy, directory: str | Path, name: str) -> None:
    """Read one component's weights into an existing policy (an actor picking up a new failure head)."""
    path = component_file(directory, name)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        state = load_file(str(path), device=str(policy.device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors: {e}") from None
    load_component_state(policy, name, state, source=str(path))


def _read_config(directory: Path) -> PolicyConfig:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(PolicyConfig), OmegaConf.load(path))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise CheckpointError(f"{path}: bad policy config key '{key}': {str(e).splitlines()[0]}") from None
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def _check(path: Path, key: str, found: object, expected: object | None) -> None:
    if expected is not None and found != expected:
        raise CheckpointError(f"{path}: '{key}' is {found!r} in the checkpoint, expected {expected!r}")


def load_policy(directory: str | Path, *, device: str | torch.device = "cpu", expect: PolicyConfig | None = None,
                state_dim: int | None = None, action_dim: int | None = None,
                cameras: Sequence[str] | None = None) -> DAGPolicy:
    """Rebuild a saved policy bit for bit; ``expect``/dims/cameras, when given, must match the checkpoint."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    cfg = _read_config(directory)
    if expect is not None:
        for field in dataclasses.fields(PolicyConfig):
            if field.name not in _NOT_ARCHITECTURE:
                _check(directory / CONFIG_FILE, f"policy.{field.name}", getattr(cfg, field.name),
                       getattr(expect, field.name))
    spec_path = directory / SPEC_FILE
    if not spec_path.is_file():
        raise CheckpointError(f"checkpoint file not found: {spec_path}")
    spec = json.loads(spec_path.read_text())
    _check(spec_path, "format", spec.get("format"), FORMAT)
    _check(spec_path, "state_dim", spec["state_dim"], state_dim)
    _check(spec_path, "action_dim", spec["action_dim"], action_dim)
    _check(spec_path, "cameras", spec["cameras"], list(cameras) if cameras is not None else None)
    config_dir = directory / BACKBONE_CONFIG_DIR
    if not (config_dir / "config.json").is_file():
        raise CheckpointError(f"checkpoint file not found: {config_dir / 'config.json'}")
    policy = DAGPolicy.from_config(
        cfg, spec["state_dim"], spec["action_dim"], spec["cameras"], vlm_config=vlm_config_of(config_dir),
        tokenizer_path=str(config_dir) if cfg.backbone == "pretrained" else None,
    ).to(device)
    normalizer_path = directory / NORMALIZER_FILE
    if not normalizer_path.is_file():
        raise CheckpointError(f"checkpoint file not found: {normalizer_path}")
    try:
        normalizer = Normalizer.load(normalizer_path)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{normalizer_path}: {e}") from None
    _check(normalizer_path, "action_mode", normalizer.action_mode, cfg.action_norm)
    _load_normalizer(policy, normalizer, normalizer_path)
    for name in policy.components:  # a critic's file is required exactly when policy.yaml says it has one
        load_component(policy, directory, name)
    return policy


def _load_normalizer(policy: DAGPolicy, normalizer: Normalizer, path: Path) -> None:
    for key, value in normalizer.state_dict().items():
        target = policy.normalizer.state_dict()[key]
        if value.shape != target.shape:
            raise CheckpointError(f"{path}: '{key}' has shape {tuple(value.shape)}, the policy expects "
                                  f"{tuple(target.shape)}")
    policy.normalizer.load_state_dict(normalizer.state_dict())
