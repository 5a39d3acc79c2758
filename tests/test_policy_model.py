"""DAGPolicy plumbing: shapes with and without cameras, the backbone's prefix, training modes, normaliser,
tokenizer and input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from afil_ray.config import PolicyConfig, SamplerConfig
from afil_ray.policy import DAGPolicy, Normalizer
from afil_ray.policy.tokenizer import BOS_ID, BYTE_OFFSET, PAD_ID, ByteTokenizer

STATE_DIM, ACTION_DIM, HORIZON = 7, 4, 5


def config(**overrides) -> PolicyConfig:
    base = dict(hidden_size=32, num_layers=1, num_heads=2, max_text_tokens=12, horizon=HORIZON, head_width=32,
                head_depth=1, image_size=32, patch_size=16)
    return PolicyConfig(**{**base, **overrides})


def window_batch(n: int, cameras: tuple[str, ...] = (), image_hw: tuple[int, int] = (48, 40), seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    batch = {"state": rng.standard_normal((n, STATE_DIM)).astype(np.float32),
             "action": rng.standard_normal((n, HORIZON, ACTION_DIM)).astype(np.float32),
             "action_is_pad": np.zeros((n, HORIZON), bool), "instruction": ["stack the red cube"] * n}
    if cameras:
        batch["images"] = {c: rng.integers(0, 256, (n, *image_hw, 3), dtype=np.uint8) for c in cameras}
    return batch


@pytest.mark.parametrize("cameras", [(), ("base",), ("base", "hand")])
def test_loss_and_sample_shapes_with_and_without_cameras(cameras):
    torch.manual_seed(0)
    policy = DAGPolicy.from_config(config(), STATE_DIM, ACTION_DIM, cameras)
    batch = window_batch(3, cameras)
    loss, metrics = policy.loss(batch, "success")
    loss.backward()
    assert loss.ndim == 0 and np.isfinite(metrics["loss"])
    assert policy.backbone.state_proj.weight.grad is not None

    prefix = policy.encode(batch["state"], batch.get("images", {}), batch["instruction"])
    patches = (32 // 16) ** 2  # images are resized to image_size for the vision tower
    assert prefix.hidden.shape == (3, len(cameras) * patches + 12 + 1, 32)
    assert prefix.mask.shape == prefix.hidden.shape[:2] and prefix.mask.dtype == torch.bool
    assert int(prefix.mask[0].sum()) == len(cameras) * patches + 1 + len("stack the red cube"[:11]) + 1

    obs = {"state": batch["state"], **{f"rgb_{c}": batch["images"][c] for c in cameras}}
    for kind in ("success_only", "static", "adaptive"):
        actions, diag = policy.sample(obs, "stack the red cube", SamplerConfig(kind=kind, steps=3))
        assert actions.shape == (3, HORIZON, ACTION_DIM) and actions.dtype == np.float32
        assert diag["w"].shape == (3, 3) and diag["sampler"] == kind


def test_state_only_policy_has_no_vision_tower_and_camera_policy_runs_it():
    state_only = DAGPolicy.from_config(config(), STATE_DIM, ACTION_DIM)
    assert not any("vision" in name for name, _ in state_only.named_parameters())
    with_camera = DAGPolicy.from_config(config(), STATE_DIM, ACTION_DIM, ("base",))
    calls = []
    with_camera.backbone.vlm.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    with_camera.sample({"state": window_batch(2)["state"], "rgb_base": window_batch(2, ("base",))["images"]["base"]},
                       "x", SamplerConfig(steps=2))
    assert calls == [1]  # once per chunk, not per denoising step
    with pytest.raises(KeyError, match="camera 'base'"):
        with_camera.sample({"state": window_batch(2)["state"]}, "x", SamplerConfig(steps=2))


def test_images_change_the_prefix_and_are_resized():
    torch.manual_seed(0)
    policy = DAGPolicy.from_config(config(), STATE_DIM, ACTION_DIM, ("base",))
    batch = window_batch(2, ("base",), image_hw=(64, 64))
    other = batch["images"]["base"].copy()
    other[0] = 255 - other[0]
    with torch.no_grad():
        a = policy.encode(batch["state"], batch["images"], batch["instruction"]).hidden
        b = policy.encode(batch["state"], {"base": other}, batch["instruction"]).hidden
    assert not torch.allclose(a[0], b[0]) and torch.equal(a[1], b[1])  # per sample


def test_prefix_attention_is_bidirectional_and_ignores_padding():
    torch.manual_seed(0)
    policy = DAGPolicy.from_config(config(), STATE_DIM, ACTION_DIM)
    state = window_batch(1)["state"]
    with torch.no_grad():
        base = policy.encode(state, {}, "ab").hidden  # tokens: BOS a b pad ... pad state
        moved_state = policy.encode(state + 1.0, {}, "ab").hidden
        ids, mask = policy.tokenizer(["ab"])
        ids[0, 5] = 77  # a different id under a padded position
        normed = policy.normalizer.normalize_state(torch.from_numpy(state))
        changed_pad = policy.backbone.encode(normed, {}, ids, mask).hidden
    assert not torch.allclose(base[0, 0], moved_state[0, 0])  # the first text token sees the last (state) token
    real = torch.cat([mask[0], torch.tensor([True])])
    assert torch.equal(base[0, real], changed_pad[0, real])  # padding is invisible to real tokens


def test_training_modes_select_and_freeze_parameters():
    policy = DAGPolicy.from_config(config(), STATE_DIM, ACTION_DIM)
    ids = {name: {id(p) for p in policy.component(name).parameters()} for name in
           ("backbone", "success_head", "failure_head")}
    assert {id(p) for p in policy.parameters_for("success_only")} == ids["backbone"] | ids["success_head"]
    assert {id(p) for p in policy.parameters_for("failure_head")} == ids["failure_head"]
    assert {id(p) for p in policy.parameters_for("joint")} == set().union(*ids.values())
    with pytest.raises(ValueError, match=r"train\.mode"):
        policy.parameters_for("everything")

    trainable = policy.set_trainable("failure_head")
    loss, _ = policy.loss(window_batch(2), "failure")
    loss.backward()
    assert all(p.grad is not None for p in trainable)
    assert all(p.grad is None for p in policy.backbone.parameters())  # a frozen backbone builds no graph
    assert all(p.grad is None for p in policy.success_head.parameters())


def test_failure_head_starts_as_a_copy_of_the_success_head_when_shapes_match():
    copied = DAGPolicy.from_config(config(), STATE_DIM, ACTION_DIM)
    for a, b in zip(copied.success_head.parameters(), copied.failure_head.parameters(), strict=True):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    fresh = DAGPolicy.from_config(config(failure_head_init="random"), STATE_DIM, ACTION_DIM)
    assert not torch.equal(fresh.success_head.action_in.weight, fresh.failure_head.action_in.weight)
    small = DAGPolicy.from_config(config(failure_head_width=16), STATE_DIM, ACTION_DIM)
    assert small.failure_head.width == 16
    with pytest.raises(ValueError, match="differs in shape"):
        small.init_failure_head_from_success()


def test_normalizer_maps_actions_to_unit_range_and_back():
    rng = np.random.default_rng(0)
    state = rng.normal(5.0, 3.0, (500, 3)).astype(np.float32)
    action = rng.uniform(-4.0, 10.0, (500, 3)).astype(np.float32)
    action[:, 2] = 0.5  # a dimension that never moves
    for mode in ("minmax", "meanstd"):
        norm = Normalizer(3, 3, mode).fit(state, action)
        a = torch.from_numpy(action)
        normed = norm.normalize_action(a)
        assert torch.allclose(norm.unnormalize_action(normed), a, atol=1e-5)
        assert torch.isfinite(normed).all() and torch.all(normed[:, 2] == 0)
        if mode == "minmax":
            assert normed[:, :2].min() == -1 and normed[:, :2].max() == 1
        s = norm.normalize_state(torch.from_numpy(state))
        assert torch.allclose(s.mean(0), torch.zeros(3), atol=1e-4)
        assert torch.allclose(s.std(0), torch.ones(3), atol=1e-2)
        again = Normalizer.from_dict(norm.to_dict())
        for key, value in norm.state_dict().items():
            assert torch.equal(value, again.state_dict()[key])  # JSON keeps float32 exactly
    identity = Normalizer(3, 3)
    x = torch.randn(4, 3)
    assert torch.equal(identity.normalize_action(x), x) and torch.equal(identity.normalize_state(x), x)


def test_sampled_actions_come_back_in_env_units():
    policy = DAGPolicy.from_config(config(), STATE_DIM, ACTION_DIM)
    policy.fit_normalizer(np.zeros((2, STATE_DIM)), np.array([[100.0, -5, 0, 1], [300.0, 5, 0.2, 3]]))
    actions, _ = policy.sample({"state": np.zeros((64, STATE_DIM), np.float32)}, "x", SamplerConfig(steps=2))
    assert actions[..., 0].min() >= 100 - 1e-3 and actions[..., 0].max() <= 300 + 1e-3  # action_clip = 1
    assert actions[..., 0].std() > 1.0


def test_byte_tokenizer_pads_truncates_and_caches():
    tok = ByteTokenizer(6)
    ids, mask = tok(["hé", "a long instruction", "hé"])
    assert ids.shape == mask.shape == (3, 6) and ids.dtype == torch.int64
    assert ids[0].tolist() == [BOS_ID, ord("h") + BYTE_OFFSET, 0xC3 + BYTE_OFFSET, 0xA9 + BYTE_OFFSET, PAD_ID, PAD_ID]
    assert mask[0].tolist() == [True] * 4 + [False] * 2 and mask[1].all()
    assert torch.equal(ids[0], ids[2]) and ids.max() < tok.vocab_size


def test_input_errors_name_the_problem():
    policy = DAGPolicy.from_config(config(), STATE_DIM, ACTION_DIM)
    with pytest.raises(ValueError, match=r"expects \[B, 7\]"):
        policy.sample({"state": np.zeros((2, 3), np.float32)}, "x", SamplerConfig())
    with pytest.raises(ValueError, match="2 instructions for a batch of 3"):
        policy.sample({"state": np.zeros((3, STATE_DIM), np.float32)}, ["a", "b"], SamplerConfig())
    bad = window_batch(2)
    bad["action"] = bad["action"][:, :3]
    with pytest.raises(ValueError, match=r"expects \[B, 5, 4\]"):
        policy.loss(bad)
    with pytest.raises(ValueError, match="head must be"):
        policy.loss(window_batch(2), "negative")
