"""Attempts that produced nothing for the store, kept beside it so re-runs never repeat them.

Demo generation records seeds whose plan failed; correction records failures the planner could not finish.
One JSON line per attempt, in a file per run (no two runs share a file), written atomically at each save.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

from pyarrow import fs as pafs

from afil_ray.replay.store import ReplayStore


class AttemptLedger:
    """``{key: record}`` of dropped attempts of one kind (``demo_failures``, ``corrections``) for one task."""

    def __init__(self, store: ReplayStore, kind: str, task: str, key: str) -> None:
        self.store, self.key = store, key
        self.dir = f"{store.root}/_meta/{kind}/task={task}"
        self.path = f"{self.dir}/{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self.lines: list[str] = []

    def known(self) -> dict[Any, dict]:
        out: dict[Any, dict] = {}
        infos = self.store.fs.get_file_info(pafs.FileSelector(self.dir, allow_not_found=True))
        for info in infos:
            if info.type != pafs.FileType.File or not info.path.endswith(".jsonl"):
                continue
            with self.store.fs.open_input_stream(info.path) as f:
                for line in f.read().decode().splitlines():
                    try:
                        rec = json.loads(line)
                        out[rec[self.key]] = rec
                    except (ValueError, KeyError):
                        continue  # a torn last line from a killed run: that attempt is simply made again
        return out

    def add(self, record: dict) -> None:
        if self.key not in record:
            raise KeyError(f"ledger record needs key {self.key!r}: {record}")
        self.lines.append(json.dumps(record, sort_keys=True))

    def save(self) -> None:
        if not self.lines:
            return
        self.store.fs.create_dir(self.dir, recursive=True)
        tmp = f"{self.dir}/.{uuid.uuid4().hex}.tmp"
        with self.store.fs.open_output_stream(tmp) as f:
            f.write(("\n".join(self.lines) + "\n").encode())
        self.store.fs.move(tmp, self.path)  # the whole file so far replaces the last save
