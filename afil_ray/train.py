"""``afil-ray train``: fit the DAG-VLA's heads from the replay store, with checkpoints and resume.

Modes: ``success_only`` trains backbone + success head on demo/success/corrected windows; ``failure_head`` trains
only the failure head on failure windows (everything else frozen: what the online learner does); ``joint``
trains backbone and both heads on both; ``critic`` trains only the success critic (``policy.critic``) on branch
and Monte-Carlo outcomes (afil_ray/replay/outcomes.py), without the held-out states it is evaluated on
(:meth:`Trainer.evaluate_critic`); ``outcome`` trains the success head (and its outcome tokens,
``policy.outcome_conditioning``) on both kinds of windows, each told its outcome (CFGRL). A kill loses at most
``checkpoint_every`` steps: the newest checkpoint (policy components, optimizer, step, RNG) is picked up by the next
run with the same ``run_dir``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from afil_ray.config import Config, ConfigError, save_resolved
from afil_ray.envs.checks import check_task, trained_tasks
from afil_ray.eval.critic import CriticReport, evaluate_critic
from afil_ray.policy import checkpoint as ckpt
from afil_ray.policy.checkpoint import CheckpointError
from afil_ray.policy.heads import OUTCOME_TOKENS
from afil_ray.policy.loading import LATEST, latest_checkpoint, load_start_policy, resolve_device
from afil_ray.policy.model import DAGPolicy
from afil_ray.provenance import machine_facts
from afil_ray.replay.chunks import ChunkSampler
from afil_ray.replay.feature_cache import FrameFeatureCache, default_cache_dir
from afil_ray.replay.outcomes import OutcomeSampler
from afil_ray.replay.sampler import WindowSampler
from afil_ray.replay.store import ReplayStore

log = logging.getLogger(__name__)
RAW_WEIGHTS = "training_weights.pt"  # the optimizer's (non-averaged) weights, for resuming


@dataclass
class _Heads:
    """Which windows train which head in a mode."""

    success: bool
    failure: bool
    critic: bool = False
    outcome: bool = False  # both kinds of windows train the success head, each with its outcome token


def _heads(mode: str) -> _Heads:
    return _Heads(success=mode in ("success_only", "joint", "outcome"),
                  failure=mode in ("failure_head", "joint", "outcome"), critic=mode == "critic",
                  outcome=mode == "outcome")


class Trainer:
    """Plain training loop (no Ray): the learner actor wraps the same class."""

    def __init__(self, cfg: Config, *, progress: bool = True, tensorboard: bool = True) -> None:
        """``tensorboard=False``: no event files of its own (the online loop's driver logs the metrics)."""
        self.cfg, self.progress = cfg, progress
        tc = cfg.train
        self.heads = _heads(tc.mode)
        if tc.num_threads:
            torch.set_num_threads(tc.num_threads)
        # the flow/diffusion noise and times come from torch's global generator: seeded, a run is repeatable
        # (a resumed run restores the generator's state from the checkpoint instead)
        torch.manual_seed(cfg.seed)
        self.device = resolve_device(tc.device)
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.tasks = list(cfg.data.tasks) or cfg.env.tasks
        self.instructions = {t: check_task(key, t).instruction for key, t in trained_tasks(cfg)}
        store = ReplayStore(cfg.replay.root)
        cameras = () if cfg.env.obs_mode == "state" else None
        h = cfg.policy.horizon
        self.samplers: dict[str, WindowSampler | ChunkSampler | OutcomeSampler] = {}
        if self.heads.success:
            self.samplers["success"] = WindowSampler(store, h, tasks=self.tasks, outcomes=cfg.data.success_outcomes,
                                                     balance=tc.balance, cameras=cameras, seed=cfg.seed,
                                                     corrected_from_restore=cfg.data.corrected_from_restore)
        if self.heads.failure:
            if tc.failure_targets == "sampled":
                self.samplers["failure"] = ChunkSampler(store, h, tasks=self.tasks, outcomes=cfg.data.failure_outcomes,
                                                        seed=cfg.seed + 1, window=cfg.data.failure_window,
                                                        cameras=cameras)
            elif tc.failure_targets == "executed":
                if cfg.data.failure_window:
                    raise ConfigError("data.failure_window needs train.failure_targets=sampled (executed windows are "
                                      "not restricted)")
                self.samplers["failure"] = WindowSampler(store, h, tasks=self.tasks,
                                                         outcomes=cfg.data.failure_outcomes, balance=tc.balance,
                                                         cameras=cameras, seed=cfg.seed + 1)
            else:
                raise ValueError(f"train.failure_targets must be sampled or executed, got {tc.failure_targets!r}")
        if self.heads.critic:
            if not cfg.policy.critic:  # Config checks this when built; a mode set afterwards is checked here
                raise ConfigError("train.mode=critic needs policy.critic=true (the critic it trains)")
            dc = cfg.data
            self.samplers["critic"] = OutcomeSampler(store, h, tasks=self.tasks, mc_outcomes=dc.critic_mc_outcomes,
                                                     mc_weight=tc.critic_mc_weight, holdout=dc.critic_holdout,
                                                     split="train", seed=cfg.seed + 2, cameras=cameras)
        for name, s in self.samplers.items():
            if name == "critic" and s.num_steps == 0:
                raise ConfigError(f"replay.root={cfg.replay.root} holds no critic rows for tasks "
                                  f"{', '.join(self.tasks)} outside the held-out states (data.critic_holdout="
                                  f"{cfg.data.critic_holdout}): branch rollouts (afil-ray branch) or store rollouts "
                                  "of data.critic_mc_outcomes with train.critic_mc_weight > 0 first")
            if s.num_steps == 0:  # a user's input (an empty or mistyped store), so one line, not a traceback
                raise ConfigError(f"replay.root={cfg.replay.root} holds no {name} windows for tasks "
                                  f"{', '.join(self.tasks)} (outcomes {', '.join(sorted(s.outcomes))}); generate "
                                  "demos (afil-ray demos) or rollouts first")
        self.step = 0
        resume = latest_checkpoint(self.run_dir)
        if resume is not None:
            self.policy = self._load_policy(resume)
        elif tc.init_from:
            self.policy = load_start_policy(tc.init_from, self.device, failure_head_init=cfg.policy.failure_head_init,
                                            seed=cfg.seed, critic=cfg.policy)
        else:
            self.policy = self._new_policy()
        self.policy.to(self.device)
        self.ema = self._make_ema() if tc.ema_decay > 0 else None
        self.params = self.policy.set_trainable(tc.mode)  # frozen parts build no autograd graph
        self.optimizer = torch.optim.AdamW(self.params, lr=tc.lr, weight_decay=tc.weight_decay)
        if resume is not None:
            self._load_trainer_state(resume)
        # encoded before the first step, not here: a finished run that is asked again loads in seconds
        self._frames_encoded = not tc.feature_cache
        save_resolved(cfg, self.run_dir)
        self.writer = SummaryWriter(str(self.run_dir / "tb"), flush_secs=30) if tensorboard else None

    def refresh_data(self) -> dict[str, int]:
        """Pick up shards written since the samplers were built (rollout actors keep adding episodes)."""
        for s in self.samplers.values():
            s.refresh()
        return {name: s.num_steps for name, s in self.samplers.items()}

    # ---------------------------------------------------------------- set-up

    def _new_policy(self) -> DAGPolicy:
        sampler = next(iter(self.samplers.values()))
        policy = DAGPolicy.from_config(self.cfg.policy, state_dim=sampler.state_dim,
                                       action_dim=sampler.action_dim, cameras=tuple(sampler.cameras))
        # normalisation statistics from the training data (a bounded sample keeps this cheap for big stores)
        fit = [s.sample(min(65536, max(1024, s.num_steps))) for s in self.samplers.values()]
        policy.fit_normalizer(np.concatenate([b["state"] for b in fit]),
                              np.concatenate([b["action"][~b["action_is_pad"]] for b in fit]))
        return policy

    def _load_policy(self, path: Path) -> DAGPolicy:
        return ckpt.load_policy(path, device=self.device)

    def _make_ema(self) -> AveragedModel:
        """An exponential moving average of the weights (``train.ema_decay``, warmed up as (1+n)/(10+n)), the
        usual stabiliser of diffusion and flow policies; checkpoints and published weights are the average."""
        decay = self.cfg.train.ema_decay

        @torch.no_grad()
        def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
            k = int(n)
            torch._foreach_lerp_(averaged, current, 1.0 - min(decay, (1.0 + k) / (10.0 + k)))

        ema = AveragedModel(self.policy, multi_avg_fn=update)
        ema.requires_grad_(False)
        return ema

    @property
    def inference_policy(self) -> DAGPolicy:
        """The weights to act with: the moving average when there is one."""
        return self.ema.module if self.ema is not None else self.policy

    def _load_trainer_state(self, path: Path) -> None:
        state = json.loads((path / "trainer.json").read_text())
        if self.ema is not None and (path / RAW_WEIGHTS).is_file():
            # the checkpoint's policy files hold the average; the raw weights continue training
            self.policy.load_state_dict(torch.load(path / RAW_WEIGHTS, map_location=self.device))
            self.ema.n_averaged.fill_(int(state.get("ema_updates", 0)))
        if state["mode"] != self.cfg.train.mode:
            raise CheckpointError(f"{path} was written in train.mode={state['mode']}, this run uses "
                                  f"{self.cfg.train.mode}; use a new run_dir (train.init_from={path})")
        self.step = int(state["step"])
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.device))
        torch.set_rng_state(torch.load(path / "torch_rng.pt"))
        for i, s in enumerate(self.samplers.values()):  # deterministic continuation of the data stream
            s.rng = np.random.default_rng([self.cfg.seed + i, self.step])
        log.info("resumed %s at step %d", path, self.step)

    # ---------------------------------------------------------------- loop

    def lr_at(self, step: int) -> float:
        tc = self.cfg.train
        if step < tc.warmup_steps:
            return tc.lr * (step + 1) / tc.warmup_steps
        progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
        return tc.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    def _encode_stored_frames(self) -> None:
        """With a frozen vision encoder, encode each stored frame once for all epochs (the samplers then hand
        out features instead of images, and encode shards added later as they pick them up)."""
        encode = self.policy.frame_features()
        if encode is None:
            self._frames_encoded = True
            return
        cache_dir = self.cfg.train.feature_cache_dir
        cache = FrameFeatureCache(cache_dir or default_cache_dir(), self.policy.frame_features_id())
        encode = cache.wrap(encode)
        with tqdm(desc="encode stored frames", unit="frame", disable=not self.progress, dynamic_ncols=True) as bar:
            def counted(camera: str, frames: np.ndarray) -> np.ndarray:
                features = encode(camera, frames)
                bar.update(len(frames))
                return features

            for s in self.samplers.values():
                if s.cameras:
                    s.encode_frames(counted)
        self._frames_encoded = True  # only once every sampler holds features (an error here is retried)
        log.info("stored frames: %d features read from %s, %d encoded", cache.hits, cache.dir, cache.misses)

    def _batch(self, name: str) -> dict[str, Any]:
        if not self._frames_encoded:
            self._encode_stored_frames()
        sampler = self.samplers[name]
        batch = sampler.sample(self.cfg.train.batch_size)
        # each window's own episode's instruction; the task's first one for shards that did not record any
        batch["instruction"] = [said or self.instructions[sampler.partitions[p][0]]
                                for said, p in zip(batch["instruction"], batch["partition"], strict=True)]
        return batch

    def train_step(self) -> dict[str, float]:
        self.policy.train()
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr_at(self.step)
        metrics: dict[str, float] = {}
        total = torch.zeros((), device=self.device)
        for head, on in (("success", self.heads.success), ("failure", self.heads.failure)):
            if on and self.heads.outcome:  # the success head on both, told which outcome each window had
                batch = self._batch(head)
                keep = torch.rand(len(batch["state"])) >= self.cfg.train.outcome_dropout  # else "none" (CFG)
                batch["outcome"] = torch.where(keep, OUTCOME_TOKENS[head], OUTCOME_TOKENS["none"])
                loss, m = self.policy.loss(batch, head="success")
                total = total + loss
                metrics[f"losses/outcome_{head}"] = float(loss.detach())
            elif on:
                loss, m = self.policy.loss(self._batch(head), head=head)
                total = total + loss
                metrics[f"losses/{head}_head"] = float(loss.detach())
                metrics.update({f"train/{head}_{k}": float(v) for k, v in m.items()})
        if self.heads.critic:
            loss, m = self.policy.critic_loss(self._batch("critic"), self.cfg.data.critic_mc_targets)
            total = total + loss
            metrics["losses/critic_q"], metrics["losses/critic_v"] = m["critic_q"], m["critic_v"]
            metrics["train/critic_success_rate"] = m["critic_success_rate"]
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(self.policy)
        self.step += 1
        metrics["train/grad_norm"] = float(grad_norm)
        metrics["train/lr"] = self.optimizer.param_groups[0]["lr"]
        return metrics

    def run(self, steps: int | None = None) -> Path:
        """Train up to ``train.steps`` (or ``steps`` more); returns the final checkpoint."""
        tc = self.cfg.train
        target = tc.steps if steps is None else self.step + steps
        bar = tqdm(total=target, initial=self.step, desc=f"train {tc.mode}", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        t0, samples = time.perf_counter(), 0
        try:
            while self.step < target:
                metrics = self.train_step()
                samples += tc.batch_size * (int(self.heads.success) + int(self.heads.failure) + int(self.heads.critic))
                bar.update(1)
                if self.step % tc.log_every == 0 or self.step == target:
                    elapsed = time.perf_counter() - t0
                    metrics["time/samples_per_s"] = samples / elapsed
                    if self.writer is not None:
                        for k, v in metrics.items():
                            self.writer.add_scalar(k, v, self.step)
                    bar.set_postfix({k.split("/")[-1]: f"{v:.4f}" for k, v in metrics.items()
                                     if k.startswith("losses/")})
                    t0, samples = time.perf_counter(), 0
                if self.step % tc.checkpoint_every == 0:
                    self.save()
        finally:
            bar.close()
            if self.writer is not None:
                self.writer.flush()
        return self.save()

    # ---------------------------------------------------------------- the critic's held-out evaluation

    def evaluate_critic(self, checkpoint: Path | None = None) -> CriticReport:
        """The critic's held-out AUROCs (afil_ray.eval.critic.py) with the weights it acts with: to
        TensorBoard (``critic/*`` at this step) and ``critic_eval.json`` in ``checkpoint`` (default: a new one)."""
        if self.policy.critic is None:
            raise ConfigError("there is no critic to evaluate (policy.critic=false)")
        checkpoint = checkpoint or self.save()
        dc = self.cfg.data
        report = evaluate_critic(self.inference_policy, ReplayStore(self.cfg.replay.root), self.tasks,
                                 mc_outcomes=dc.critic_mc_outcomes, holdout=dc.critic_holdout,
                                 instructions=self.instructions, batch_size=self.cfg.train.batch_size)
        report.checkpoint = str(checkpoint)
        report.write(checkpoint)
        if self.writer is not None:
            for key, value in report.scalars().items():
                self.writer.add_scalar(key, value, self.step)
            self.writer.flush()
        return report

    # ---------------------------------------------------------------- checkpoints

    def save(self) -> Path:
        """Write ``checkpoints/step_NNNNNNNN`` atomically (temporary directory, then rename) and point
        ``latest`` at it; an existing checkpoint of the same step is kept."""
        name = f"step_{self.step:08d}"
        final = self.ckpt_dir / name
        if final.is_dir():
            return final
        tmp = self.ckpt_dir / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        ckpt.save_policy(self.inference_policy, tmp)
        # the machine facts say where these weights were made (their digits depend on it), not what resumes them
        state: dict[str, Any] = {"step": self.step, "mode": self.cfg.train.mode, "machine": machine_facts()}
        if self.ema is not None:
            torch.save(self.policy.state_dict(), tmp / RAW_WEIGHTS)
            state["ema_updates"] = int(self.ema.n_averaged)
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(torch.get_rng_state(), tmp / "torch_rng.pt")
        (tmp / "trainer.json").write_text(json.dumps(state))
        os.replace(tmp, final)
        pointer_tmp = self.ckpt_dir / f".{LATEST}.tmp"
        pointer_tmp.write_text(name)
        os.replace(pointer_tmp, self.ckpt_dir / LATEST)
        return final
