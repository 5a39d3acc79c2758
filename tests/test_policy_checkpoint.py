"""Checkpoints: bit-exact round trips, one-component updates, a pretrained backbone loaded through
``from_pretrained``, and errors that name the file and the key."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from afil_ray.config import PolicyConfig, SamplerConfig
from afil_ray.policy import (
    CheckpointError,
    DAGPolicy,
    load_component,
    load_component_state,
    load_policy,
    save_component,
    save_policy,
)
from afil_ray.policy.backbone import tiny_vlm_config

STATE_DIM, ACTION_DIM = 6, 3


def config(**overrides) -> PolicyConfig:
    base = dict(hidden_size=32, num_layers=1, num_heads=2, max_text_tokens=10, horizon=4, head_width=32,
                head_depth=2, image_size=32, patch_size=16)
    return PolicyConfig(**{**base, **overrides})


def trained_like(cfg: PolicyConfig, cameras: tuple[str, ...] = (), seed: int = 0) -> DAGPolicy:
    """A policy with fitted statistics and a failure head that differs from the success head."""
    torch.manual_seed(seed)
    policy = DAGPolicy.from_config(cfg, STATE_DIM, ACTION_DIM, cameras)
    rng = np.random.default_rng(seed)
    policy.fit_normalizer(rng.normal(3, 2, (100, STATE_DIM)), rng.uniform(-2, 5, (100, ACTION_DIM)))
    with torch.no_grad():
        for p in policy.failure_head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return policy


def observation(cameras: tuple[str, ...] = (), n: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    obs = {"state": rng.normal(3, 2, (n, STATE_DIM)).astype(np.float32)}
    for cam in cameras:
        obs[f"rgb_{cam}"] = rng.integers(0, 256, (n, 40, 40, 3), dtype=np.uint8)
    return obs


def assert_same_weights(a: DAGPolicy, b: DAGPolicy) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("cameras", [(), ("base",)])
def test_round_trip_is_bit_exact(tmp_path, cameras):
    policy = trained_like(config(), cameras)
    save_policy(policy, tmp_path / "ckpt")
    loaded = load_policy(tmp_path / "ckpt", expect=config(), state_dim=STATE_DIM, action_dim=ACTION_DIM,
                         cameras=cameras)
    assert loaded.config == policy.config and loaded.cameras == cameras
    assert_same_weights(policy, loaded)
    assert loaded.normalizer.to_dict() == policy.normalizer.to_dict()
    sampler = SamplerConfig(kind="adaptive", lam=1.0)
    a, da = policy.sample(observation(cameras), "stack", sampler, torch.Generator().manual_seed(3))
    b, db = loaded.sample(observation(cameras), "stack", sampler, torch.Generator().manual_seed(3))
    assert np.array_equal(a, b) and np.array_equal(da["w"], db["w"])
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["backbone.safetensors", "backbone_config", "failure_head.safetensors", "normalizer.json",
                     "policy.yaml", "spec.json", "success_head.safetensors"]


def test_only_the_failure_head_ships_after_an_update(tmp_path):
    policy = trained_like(config())
    save_policy(policy, tmp_path / "ckpt")
    actor = load_policy(tmp_path / "ckpt")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ckpt").iterdir()}

    with torch.no_grad():  # the learner retrains the failure head online
        for p in policy.failure_head.parameters():
            p.mul_(1.5)
    written = save_component(policy, tmp_path / "ckpt", "failure_head")
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ckpt").iterdir()}
    assert written.name == "failure_head.safetensors"
    assert [name for name in before if before[name] != after[name]] == ["failure_head.safetensors"]

    sampler = SamplerConfig(kind="adaptive")
    stale, _ = actor.sample(observation(), "x", sampler, torch.Generator().manual_seed(0))
    load_component(actor, tmp_path / "ckpt", "failure_head")
    assert_same_weights(policy, actor)
    fresh, _ = actor.sample(observation(), "x", sampler, torch.Generator().manual_seed(0))
    want, _ = policy.sample(observation(), "x", sampler, torch.Generator().manual_seed(0))
    assert np.array_equal(fresh, want) and not np.array_equal(stale, fresh)  # fused weights were restacked


def test_weights_sent_in_memory_are_checked_too():
    policy = trained_like(config())
    other = trained_like(config(), seed=1)
    load_component_state(other, "failure_head", policy.failure_head.state_dict())
    assert torch.equal(other.failure_head.action_out.weight, policy.failure_head.action_out.weight)
    state = dict(policy.failure_head.state_dict())
    del state["action_out.bias"]
    with pytest.raises(CheckpointError, match=r"lacks key 'action_out\.bias'"):
        load_component_state(other, "failure_head", state)


def _save_tiny_pretrained(path, cfg: PolicyConfig) -> torch.nn.Module:
    """A PaliGemma-class checkpoint and tokenizer in Hugging Face's own layout, as a downloaded one would be."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PaliGemmaModel, PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "stack", "the", "red", "cube", "on", "green"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>").save_pretrained(str(path))
    torch.manual_seed(5)
    model = PaliGemmaModel(tiny_vlm_config(cfg, vocab_size=len(words) + 4))
    model.save_pretrained(str(path))
    return model


def test_pretrained_backbone_loads_through_from_pretrained_and_checkpoints_stand_alone(tmp_path):
    cfg = config(backbone="pretrained", pretrained_path=str(tmp_path / "vlm"))
    source = _save_tiny_pretrained(tmp_path / "vlm", cfg)
    policy = DAGPolicy.from_config(cfg, STATE_DIM, ACTION_DIM, ("base",))
    for key, value in source.state_dict().items():
        assert torch.equal(policy.backbone.vlm.state_dict()[key], value), key
    ids, mask = policy.tokenizer(["stack the red cube", "stack the blue cube"])
    assert ids[0, : int(mask[0].sum())].tolist() == [2, 3, 4, 5] and ids[1, 2].item() == 1  # <unk>
    actions, _ = policy.sample(observation(("base",)), "stack the red cube", SamplerConfig(kind="adaptive"))
    assert actions.shape == (3, 4, ACTION_DIM)

    save_policy(policy, tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "vlm")  # the checkpoint carries the architecture and the tokenizer itself
    loaded = load_policy(tmp_path / "ckpt")
    assert_same_weights(policy, loaded)
    assert torch.equal(loaded.tokenizer(["stack the red cube"])[0], ids[:1])

    with pytest.raises(FileNotFoundError, match="pretrained_path"):
        DAGPolicy.from_config(cfg, STATE_DIM, ACTION_DIM, ("base",))


def test_missing_and_mismatching_checkpoints_are_clear_errors(tmp_path):
    policy = trained_like(config())
    ckpt = tmp_path / "ckpt"
    save_policy(policy, ckpt)

    with pytest.raises(CheckpointError, match=r"checkpoint directory not found: .*nowhere"):
        load_policy(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"'policy\.head_depth' is 2 in the checkpoint, expected 3"):
        load_policy(ckpt, expect=config(head_depth=3))
    with pytest.raises(CheckpointError, match=r"spec\.json: 'state_dim' is 6 in the checkpoint, expected 9"):
        load_policy(ckpt, state_dim=9)
    load_policy(ckpt, expect=config(pretrained_path="/elsewhere"))  # where weights came from may differ

    wider = DAGPolicy.from_config(config(failure_head_width=64), STATE_DIM, ACTION_DIM)
    with pytest.raises(CheckpointError, match=r"failure_head\.safetensors: failure_head key '[\w.]+' has shape"):
        load_component(wider, ckpt, "failure_head")

    (ckpt / "failure_head.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"failure_head\.safetensors: cannot read"):
        load_policy(ckpt)
    (ckpt / "failure_head.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint file not found: .*failure_head\.safetensors"):
        load_policy(ckpt)

    (ckpt / "policy.yaml").write_text((ckpt / "policy.yaml").read_text() + "head_dpth: 3\n")
    with pytest.raises(CheckpointError, match=r"policy\.yaml: bad policy config key 'head_dpth'"):
        load_policy(ckpt)
