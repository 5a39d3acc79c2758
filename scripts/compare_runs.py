"""Whether two ``afil-ray reproduce`` run directories hold the same numbers: every checkpoint bit for bit, the data
the stages produced, and every arm's successes.

Why: a change meant to leave behaviour alone (a refactor, a dependency bump) is checked by running the same command
before and after it and comparing here; only the online loop, which runs for a wall-clock budget, may differ.

    .venv/bin/python scripts/compare_runs.py RUN_A RUN_B

Prints a Markdown table per part and exits 1 when any number differs. Last, which machine facts (``stages/*.json``'s
``machine``: CPU, SIMD flags, thread counts, versions, commit) differ between the runs' stages: information, not a
difference in numbers, but the first thing to look at when the numbers differ (``docs/results.md``,
"Reproducibility").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import load_file

from afil_ray.provenance import describe_differences

# what each stage's outputs say about the data it made (the rest are paths and wall times)
DATA_KEYS = {"demos": ("demos", "added", "dropped"), "harvest": ("episodes", "failures", "success_rate"),
             "correct": ("tried", "corrected_now", "dropped", "corrected_in_store")}


def stage(run: Path, name: str) -> dict:
    path = run / "stages" / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def checkpoint_diff(a: Path, b: Path) -> str:
    """``identical`` or what differs, over every safetensors file of two checkpoint directories."""
    files = sorted({p.name for p in a.glob("*.safetensors")} | {p.name for p in b.glob("*.safetensors")})
    if not files:
        return "no weights found"
    differ = []
    for name in files:
        if not (a / name).is_file() or not (b / name).is_file():
            differ.append(f"{name} missing")
            continue
        ta, tb = load_file(a / name), load_file(b / name)
        if ta.keys() != tb.keys() or any(not ta[k].equal(tb[k]) for k in ta):
            differ.append(name)
    return "identical" if not differ else "differs: " + ", ".join(differ)


def machine_rows(a: Path, b: Path) -> list[str]:
    """One Markdown row per stage recorded in either run: the machine facts that differ between the two."""
    rows = []
    for name in sorted({p.stem for r in (a, b) for p in (r / "stages").glob("*.json")}):
        ma, mb = (stage(r, name).get("machine") for r in (a, b))
        if ma is None or mb is None:
            verdict = "stage missing" if not (stage(a, name) and stage(b, name)) else "not recorded"
        else:
            verdict = describe_differences(ma, mb) or "none"
        rows.append(f"| {name} | {verdict} |")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    args = p.parse_args()
    same = True

    print("| stage | A | B | same |\n|---|---|---|---|")
    for name, keys in DATA_KEYS.items():
        a, b = (stage(r, name).get("outputs", {}) for r in (args.run_a, args.run_b))
        va, vb = ({k: o.get(k) for k in keys} for o in (a, b))
        same &= va == vb
        print(f"| {name} | {va} | {vb} | {'yes' if va == vb else '**no**'} |")

    print("\n| checkpoint | tensors |\n|---|---|")
    for name in ("success_only", "corrected", "dag"):
        ca, cb = (Path(stage(r, name).get("outputs", {}).get("checkpoint", "")) for r in (args.run_a, args.run_b))
        verdict = checkpoint_diff(ca, cb) if ca.name and cb.name else "stage missing"
        same &= verdict == "identical"
        print(f"| {name} ({ca.name}) | {verdict} |")

    reports = [json.loads((r / "results" / "report.json").read_text()) for r in (args.run_a, args.run_b)]
    [(task, body_a)], [(_, body_b)] = (rep["tasks"].items() for rep in reports)
    arms_b = {e["arm"]: e for e in body_b["arms"]}
    print(f"\n{task}, `{reports[0]['metric']}`:\n\n| arm | A successes | B successes | mean w A | mean w B | same |")
    print("|---|---|---|---|---|---|")
    for entry in body_a["arms"]:
        other = arms_b.get(entry["arm"], {})
        wa, wb = (rep.get("mean_w", {}).get(entry["arm"]) for rep in reports)
        equal = (entry["successes"], entry["episodes"], wa) == (other.get("successes"), other.get("episodes"), wb)
        same &= equal
        print(f"| {entry['arm']} | {entry['successes']}/{entry['episodes']} | {other.get('successes')}/"
              f"{other.get('episodes')} | {wa} | {wb} | {'yes' if equal else '**no**'} |")
    same &= set(arms_b) == {e["arm"] for e in body_a["arms"]}
    print("\nMachine facts (information):\n\n| stage | facts that differ (A -> B) |\n|---|---|")
    print("\n".join(machine_rows(args.run_a, args.run_b)))
    print(f"\n{'same numbers' if same else 'the runs differ'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
