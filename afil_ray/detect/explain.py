"""``afil-ray explain``: ARMOR's detector-explainer on a reproduction, its ablation study, and its answers.

- ``explainer_study``: collects rollouts of the run's policies (``detect.collect_policies``) into the detector's
  store, encodes their frames with the backbone stage's policy, labels them (``afil_ray/detect/labels.py``), and
  trains and measures every recipe of ``detect.study_recipes`` at every ratio of ``detect.study_ratios`` on
  episodes from initial states none of them trained on (``run_dir/detect/explain.{json,md}``).
- ``explain_episodes``: the detector-explainer of ``detect.recipe`` at ``detect.sparse_per_dense`` (trained on the
  detector's store on first use, then kept in ``run_dir/detect/explainer``) answers for episodes of
  ``replay.root`` and writes its answers into that store, beside the episodes
  (``_meta/explanations/<run_id>.arrow``: episode id, failure probability, explanation), read back with
  ``read_explanations``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.feather as feather
import torch

from afil_ray.config import Config, ConfigError
from afil_ray.detect.armor import RECIPES, ArmorSettings, infer, train
from afil_ray.detect.causes import SUCCESS
from afil_ray.detect.dataset import SOURCE_PREFIX, Labelled, collect, frame_features, is_test
from afil_ray.detect.explainer import (
    DetectorExplainer,
    ExplainerShape,
    ExplanationTokenizer,
    load_explainer,
    save_explainer,
)
from afil_ray.detect.labels import check_labelled_task
from afil_ray.detect.quality import quality
from afil_ray.pipeline.stages import recorded_outputs
from afil_ray.policy.checkpoint import load_policy
from afil_ray.policy.model import DAGPolicy
from afil_ray.replay.episode import Episode
from afil_ray.replay.store import ReplayStore

DETECT_DIR = "detect"
STUDY_ROWS = "explain_rows"  # under DETECT_DIR: one file per measured row of the study (recipe@ratio)
EXPLANATIONS_DIR = "_meta/explanations"


def stage_checkpoint(run_dir: str | Path, spec: str) -> str:
    """``<stage>`` (its final checkpoint) or ``<stage>@<step>`` (that step's) of a reproduction."""
    stage, at, step = spec.partition("@")
    outputs = recorded_outputs(run_dir, stage)
    if not at:
        return outputs["checkpoint"]
    path = Path(outputs["run_dir"]) / "checkpoints" / f"step_{int(step):08d}"
    if not path.is_dir():
        raise ConfigError(f"detect.collect_policies: {spec!r}: no checkpoint {path}")
    return str(path)


def _settings(cfg: Config) -> ArmorSettings:
    return ArmorSettings(warmup_epochs=cfg.detect.warmup_epochs, online_epochs=cfg.detect.online_epochs)


def _detector_data(cfg: Config, progress: bool) -> tuple[Labelled, torch.Tensor, list[bool], DAGPolicy]:
    """The detector's labelled rollouts (collected first if missing), their frame features and test flags: by
    initial state, or with ``detect.transfer_to`` by task (every episode of that task is a test episode)."""
    for task in cfg.env.tasks:
        check_labelled_task("env.task", task)  # before hours of rollouts and training
    transfer = cfg.detect.transfer_to
    if transfer is not None and (transfer not in cfg.env.tasks or len(cfg.env.tasks) < 2):
        raise ConfigError(f"detect.transfer_to={transfer!r} must be one of several tasks in env.task "
                          f"({', '.join(cfg.env.tasks)}): the others are what the detector trains on")
    root = Path(cfg.run_dir)
    store = ReplayStore(root / DETECT_DIR / "replay")
    checkpoints = {spec: stage_checkpoint(root, spec) for spec in cfg.detect.collect_policies}
    collect(cfg, checkpoints, store, cfg.detect.collect_seed_start, cfg.detect.collect_seeds, progress)
    episodes = [e for e in store.read_episodes(cfg.env.tasks, ["success", "failure"])
                if e.source.startswith(SOURCE_PREFIX)]
    backbone = load_policy(stage_checkpoint(root, cfg.detect.backbone)).eval()
    features = frame_features(backbone, episodes, cfg.detect.frames, progress)
    test = [e.task == transfer if transfer is not None else is_test(e.seed, cfg.detect.test_share)
            for e in episodes]
    return Labelled.of(episodes), features, test, backbone


def _new_model(cfg: Config, features: torch.Tensor, tokenizer: ExplanationTokenizer, seed: int) -> DetectorExplainer:
    torch.manual_seed(seed)
    shape = ExplainerShape(feature_dim=features.shape[-1], frames=cfg.detect.frames)
    return DetectorExplainer(shape, tokenizer.vocab_size, tokenizer.pad)


def _rows(items: list, keep: list[bool]) -> list:
    return [x for x, k in zip(items, keep, strict=True) if k]


def study_key(cfg: Config, labelled: Labelled, test: list[bool]) -> str:
    """What a study row depends on: the episodes and their split, the backbone, the frames, the recipe settings
    and the seed."""
    return hashlib.blake2b(json.dumps([
        [e.episode_id for e in labelled.episodes], test, stage_checkpoint(cfg.run_dir, cfg.detect.backbone),
        cfg.detect.frames, dataclasses.asdict(_settings(cfg)), cfg.seed]).encode(), digest_size=8).hexdigest()


def explainer_study(cfg: Config, progress: bool = True) -> dict[str, Any]:
    """ARMOR's ablation rows at each ratio, measured on held-out initial states; writes run_dir/detect/explain.*"""
    labelled, features, test, _ = _detector_data(cfg, progress)
    train_rows = [not t for t in test]
    tokenizer = ExplanationTokenizer(ExplainerShape.max_tokens)
    train_set = Labelled(*(_rows(getattr(labelled, f.name), train_rows) for f in dataclasses.fields(Labelled)))
    test_set = Labelled(*(_rows(getattr(labelled, f.name), test) for f in dataclasses.fields(Labelled)))
    train_features, test_features = features[torch.tensor(train_rows)], features[torch.tensor(test)]
    settings = _settings(cfg)
    rows = []
    # each row is kept as it is measured (a stopped study goes on at the next row), under the data and settings
    # that made it
    cached = Path(cfg.run_dir) / DETECT_DIR / STUDY_ROWS
    data_key = study_key(cfg, labelled, test)
    for ratio in cfg.detect.study_ratios:
        batch = train_set.batch(train_features, tokenizer, ratio)
        trained: dict[tuple[bool, bool], DetectorExplainer] = {}  # recipes that train alike share the model
        for name in cfg.detect.study_recipes:
            row_file = cached / f"{name}@{ratio:g}.json"
            if row_file.is_file() and json.loads(row_file.read_text())["key"] == data_key:
                rows.append(json.loads(row_file.read_text())["row"])
                continue
            recipe = RECIPES[name]
            key = (recipe.conditioned, recipe.online)
            if key not in trained:
                model = _new_model(cfg, features, tokenizer, cfg.seed)
                train(model, batch, tokenizer, recipe, settings, seed=cfg.seed, progress=progress)
                trained[key] = model
            answers = infer(trained[key], test_features, tokenizer, recipe, settings, seed=cfg.seed)
            q = quality([e.task for e in test_set.episodes], test_set.failed.tolist(), test_set.causes,
                        test_set.explanations, test_set.heldout_explanations,
                        [a.failure_probability for a in answers], [a.text for a in answers])
            rows.append({"recipe": name, "sparse_per_dense": ratio, "dense_train": int(batch.dense.sum()),
                         "mean_rounds": sum(a.rounds for a in answers) / len(answers), **dataclasses.asdict(q)})
            cached.mkdir(parents=True, exist_ok=True)
            row_file.write_text(json.dumps({"key": data_key, "row": rows[-1]}, indent=1) + "\n")
            if progress:
                print(f"  {name} @ {ratio:g}: {rows[-1]}")
    trained_on = sorted({e.task for e in train_set.episodes})
    result = {
        "task": ", ".join(cfg.env.tasks), "transfer": None if cfg.detect.transfer_to is None else
        {"train_tasks": trained_on, "test_task": cfg.detect.transfer_to}, "episodes": len(labelled.episodes),
        "train": _split(train_set), "test": _split(test_set),
        "causes": _cause_counts(labelled.causes),
        "rows": rows,
    }
    out = Path(cfg.run_dir) / DETECT_DIR
    out.mkdir(parents=True, exist_ok=True)
    (out / "explain.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "explain.md").write_text(study_markdown(result) + "\n")
    return result


def _split(part: Labelled) -> dict[str, Any]:
    """A split's size and causes: a failure-cause accuracy reads against how often its commonest cause occurs."""
    return {"episodes": len(part.episodes), "failures": int(part.failed.sum()),
            "causes": _cause_counts(part.causes)}


def _cause_counts(causes: list[str]) -> dict[str, int]:
    return {c: causes.count(c) for c in sorted(set(causes))}


def study_markdown(result: dict[str, Any]) -> str:
    causes = ", ".join(f"{c} {n}" for c, n in result["causes"].items())
    transfer = result.get("transfer")
    trained = "" if transfer is None else f" of {', '.join(transfer['train_tasks'])}"
    measured = "other initial states" if transfer is None else f"{transfer['test_task']}, a task it never saw"
    lines = [f"{result['task']}: {result['episodes']} episodes ({causes}); trained on {result['train']['episodes']}"
             f"{trained} ({result['train']['failures']} failures), measured on {result['test']['episodes']} from "
             f"{measured} ({result['test']['failures']} failures: {_failure_causes(result['test'])}).", "",
             "| recipe | sparse:dense | dense (train) | detection acc. | cause acc. | cause acc. (failures) | "
             "similarity | similarity (held-out phrasing) | consistency | rounds |", "|" + "---|" * 10]
    for r in result["rows"]:
        fail = "—" if r["failure_cause_accuracy"] is None else f"{r['failure_cause_accuracy']:.3f}"
        lines.append(f"| {r['recipe']} | {r['sparse_per_dense']:g} | {r['dense_train']} | "
                     f"{r['detection_accuracy']:.3f} | {r['cause_accuracy']:.3f} | {fail} | {r['similarity']:.3f} | "
                     f"{r['heldout_similarity']:.3f} | {r['consistency']:.3f} | {r['mean_rounds']:.2f} |")
    return "\n".join(lines)


def _failure_causes(split: dict[str, Any]) -> str:
    return ", ".join(f"{c} {n}" for c, n in split.get("causes", {}).items() if c != SUCCESS) or "none"


def trained_explainer(cfg: Config, progress: bool = True) -> tuple[DetectorExplainer, DAGPolicy]:
    """``run_dir/detect/explainer`` (``detect.recipe`` at ``detect.sparse_per_dense``), trained on every collected
    episode if it is not there yet, and the backbone policy that encodes its frames."""
    directory = Path(cfg.run_dir) / DETECT_DIR / "explainer"
    backbone_ckpt = stage_checkpoint(cfg.run_dir, cfg.detect.backbone)
    try:
        model, spec = load_explainer(directory)
    except FileNotFoundError:
        labelled, features, _, backbone = _detector_data(cfg, progress)
        tokenizer = ExplanationTokenizer(ExplainerShape.max_tokens)
        model = _new_model(cfg, features, tokenizer, cfg.seed)
        train(model, labelled.batch(features, tokenizer, cfg.detect.sparse_per_dense), tokenizer,
              RECIPES[cfg.detect.recipe], _settings(cfg), seed=cfg.seed, progress=progress)
        save_explainer(model, directory, recipe=cfg.detect.recipe, sparse_per_dense=cfg.detect.sparse_per_dense,
                       backbone=backbone_ckpt, episodes=len(labelled.episodes))
        return model.eval(), backbone
    if spec.get("backbone") != backbone_ckpt or spec.get("recipe") != cfg.detect.recipe:
        raise ConfigError(f"{directory} was trained with recipe {spec.get('recipe')!r} on {spec.get('backbone')}; "
                          f"this config asks for {cfg.detect.recipe!r} on {backbone_ckpt} (delete it to retrain)")
    return model, load_policy(backbone_ckpt).eval()


def explain_episodes(cfg: Config, episodes: list[Episode], progress: bool = True) -> pa.Table:
    """Detection and explanation for ``episodes``, written into ``replay.root`` beside them; returns the rows."""
    model, backbone = trained_explainer(cfg, progress)
    if not episodes:
        raise ConfigError(f"replay.root={cfg.replay.root}: no episodes to explain")
    tokenizer = ExplanationTokenizer(model.shape.max_tokens)
    features = frame_features(backbone, episodes, model.shape.frames, progress)
    answers = infer(model, features, tokenizer, RECIPES[cfg.detect.recipe], _settings(cfg), seed=cfg.seed)
    table = pa.table({
        "episode_id": [e.episode_id for e in episodes],
        "task": [e.task for e in episodes],
        "failure_probability": pa.array([a.failure_probability for a in answers], pa.float32()),
        "detected_failure": [a.failure_probability > 0.5 for a in answers],
        "explanation": [a.text for a in answers],
        "certainty_score": pa.array([a.certainty_score for a in answers], pa.float32()),
        "rounds": pa.array([a.rounds for a in answers], pa.int32()),
        "recipe": [cfg.detect.recipe] * len(answers),
        "created": pa.array([datetime.now(UTC)] * len(answers), pa.timestamp("us", tz="UTC")),
    })
    out = Path(cfg.replay.root) / EXPLANATIONS_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{cfg.run_id or 'explain'}.arrow"
    tmp = path.with_suffix(".tmp")
    feather.write_feather(table, tmp, compression="uncompressed")
    tmp.replace(path)
    return table


def read_explanations(root: str | Path) -> pa.Table | None:
    """Every answer written into the store at ``root`` (all runs' files), or None if there are none."""
    files = sorted((Path(root) / EXPLANATIONS_DIR).glob("*.arrow"))
    return pa.concat_tables([feather.read_table(f) for f in files]) if files else None
