"""Run ids: each invocation that writes (the loop, demos, correction, a reproduction) names itself once, so its
TensorBoard folder and every episode it stores say which run they came from, however often a ``run_dir`` or a
replay store is reused."""

from __future__ import annotations

import dataclasses
import time
import uuid

from afil_ray.config import Config


def new_run_id(kind: str) -> str:
    """``20261129-231500-run-3fa2c1``: sortable by start time, readable, unique across machines."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{uuid.uuid4().hex[:6]}"


def with_run_id(cfg: Config, kind: str) -> Config:
    """``cfg`` with ``run_id`` set (a fresh id when the user did not name the run)."""
    return cfg if cfg.run_id else dataclasses.replace(cfg, run_id=new_run_id(kind))
