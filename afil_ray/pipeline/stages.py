"""The stage cache: each stage of a reproduction runs once per run directory, under the settings it ran with.

A completed stage writes ``run_dir/stages/<stage>.json`` (its settings, outputs, wall time and the machine facts of
``afil_ray.provenance``) and is skipped on the next call. A stage completed under other settings is an error naming
the keys, since its outputs no longer match the config. One completed on another machine is reused, with a line
saying which facts differ: its digits are what that machine made (``docs/results.md``, "Reproducibility").
``DEPENDS`` says which config keys each stage's outputs depend on.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from afil_ray.config import Config, ConfigError
from afil_ray.provenance import describe_differences, machine_facts

STAGES = ("demos", "success_only", "harvest", "correct", "corrected", "dag", "outcome_head", "branch", "critic",
          "branch_heads", "online", "eval")

# The config sections each stage's outputs depend on (a change there after the stage completed is an error).
DEPENDS: dict[str, tuple[str, ...]] = {
    "demos": ("env", "demos"),
    "success_only": ("env", "demos", "policy", "train", "seed"),
    "harvest": ("env", "demos", "policy", "train", "seed", "sampler", "reproduce.harvest_seed_start",
                "reproduce.harvest_seeds", "reproduce.harvest_runs"),
}
DEPENDS["correct"] = (*DEPENDS["harvest"], "correct")
DEPENDS["corrected"] = (*DEPENDS["correct"], "reproduce.correction_steps")
DEPENDS["dag"] = (*DEPENDS["corrected"], "reproduce.failure_head_steps", "reproduce.failure_outcomes")
DEPENDS["branch"] = (*DEPENDS["corrected"], "branches")
DEPENDS["critic"] = (*DEPENDS["branch"], "reproduce.critic_steps", "data.critic_holdout", "data.critic_mc_outcomes",
                     "data.critic_mc_targets")
DEPENDS["online"] = (*DEPENDS["dag"], "loop", "reproduce.online_s")
DEPENDS["eval"] = (*DEPENDS["online"], "eval", "reproduce.static_w", "reproduce.lams")
DEPENDS["branch_heads"] = DEPENDS["branch"]
DEPENDS["outcome_head"] = DEPENDS["dag"]
# the eval stage's too, when it has these arms
CRITIC_EVAL_DEPENDS = (*DEPENDS["critic"], "reproduce.critic_arms")
BRANCH_RULE_EVAL_DEPENDS = (*DEPENDS["branch_heads"], "reproduce.branch_rule_arms")
OUTCOME_EVAL_DEPENDS = (*DEPENDS["outcome_head"], "reproduce.outcome_arms")


def select(cfg: Config, keys: tuple[str, ...]) -> dict[str, Any]:
    """The values of ``keys`` (sections or dotted keys) as plain data."""
    tree = OmegaConf.to_container(OmegaConf.structured(cfg))
    out = {}
    for key in keys:
        node: Any = tree
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out


_ABSENT = object()


def changed_keys(old: Any, new: Any, prefix: str = "", default: Any = None) -> list[str]:
    """Dotted keys whose values differ between two settings trees. A key the old tree lacks (a stage recorded
    before the key existed) counts as unchanged when the new value is the key's default in ``default`` (the same
    tree of defaults), since a key added with a default that keeps the old behaviour changes no outputs."""
    if isinstance(old, dict) and isinstance(new, dict):
        default = default if isinstance(default, dict) else {}
        return [d for k in sorted(set(old) | set(new))
                for d in changed_keys(old.get(k, _ABSENT), new.get(k, _ABSENT), f"{prefix}{k}.",
                                      default.get(k, _ABSENT))]
    if old is _ABSENT:
        old = default
    return [] if old == new else [prefix.rstrip(".")]


def with_updates(cfg: Config, **sections: Any) -> Config:
    """A copy of ``cfg`` with keys of some sections replaced (``train={"steps": 10}``); ``run_dir=...`` too."""
    out = cfg
    for name, value in sections.items():
        if isinstance(value, dict):
            out = dataclasses.replace(out, **{name: dataclasses.replace(getattr(out, name), **value)})
        else:
            out = dataclasses.replace(out, **{name: value})
    return out


def recorded_outputs(root: str | Path, stage: str) -> dict[str, Any]:
    """The outputs a completed stage recorded under ``root`` (a run directory), for commands that build on a
    reproduction; a stage that has not completed there is a one-line error."""
    marker = Path(root) / "stages" / f"{stage}.json"
    if not marker.is_file():
        raise ConfigError(f"stage {stage!r} has not completed in {root} (no {marker}); run `afil-ray reproduce` "
                          "with this config first")
    return json.loads(marker.read_text())["outputs"]


class StageCache:
    """Runs a stage unless ``root/stages/<stage>.json`` says it completed under the same settings.

    The machine facts are read once, when the cache is made (before any stage sets torch's thread count), so a
    re-run compares like with like; the config's thread settings are in each stage's settings."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.records: dict[str, dict[str, Any]] = {}  # stage -> its record, for the reports' wall times
        self.machine = machine_facts()

    def marker(self, stage: str) -> Path:
        return self.root / "stages" / f"{stage}.json"

    def run(self, stage: str, fn: Callable[[], dict[str, Any]], settings: dict[str, Any],
            defaults: dict[str, Any] | None = None) -> dict[str, Any]:
        """The stage's outputs: cached, or from ``fn()`` (then recorded atomically). ``defaults``: the same keys'
        default values (keys added since a stage was recorded are compared with them)."""
        marker = self.marker(stage)
        if marker.is_file():
            record = json.loads(marker.read_text())
            changed = changed_keys(record["settings"], json.loads(json.dumps(settings)),
                                   default=json.loads(json.dumps(defaults or {})))
            if changed:
                raise ConfigError(
                    f"stage {stage!r} of {self.root} was completed with other settings ({', '.join(changed[:8])}); "
                    f"its outputs do not match this config. Use another run_dir, or delete {marker} (and the "
                    f"stage's outputs) to redo it.")
            print(f"[{stage}] cached ({record['seconds']:.0f} s when it ran): {brief(record['outputs'])}")
            differ = describe_differences(record["machine"], self.machine, ("then", "now")) \
                if "machine" in record else ""
            if differ:
                line = f"[{stage}] machine facts differ from when it ran (information; outputs kept): {differ}"
                print(line[:600])
            self.records[stage] = record
            return record["outputs"]
        print(f"[{stage}] running")
        t0 = time.time()
        outputs = fn()
        record = {"stage": stage, "seconds": time.time() - t0, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "settings": settings, "outputs": outputs, "machine": self.machine}
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
        tmp.replace(marker)
        print(f"[{stage}] done in {record['seconds']:.0f} s: {brief(outputs)}")
        self.records[stage] = record
        return outputs

    def outputs(self, stage: str) -> dict[str, Any]:
        """A completed stage's outputs ({} if it has not run in this call)."""
        return self.records.get(stage, {}).get("outputs", {})


def brief(outputs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in outputs.items() if not isinstance(v, dict) or k == "dropped")[:300]
