"""Frame features on disk: what a frozen vision encoder said about stored frames, keyed by the frames themselves.

Every training stage that reads one store (success only, + failure correction, the failure head, the loop's
learner) would otherwise run the frozen encoder over every stored frame again: about 7 minutes per stage for
LIBERO-Object's 42,000 frames on 2 cores. A file's name is a hash of the frames' bytes under a directory named by
the encoder (its weights and settings), so a changed shard or another encoder misses instead of reading stale
features. Files are written whole (a temporary name, then a rename), so a killed run leaves no half file; a damaged
file is encoded again and replaced. The directory is a cache: deleting it costs only the encoding.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FrameEncoder = Callable[[str, np.ndarray], np.ndarray]  # (camera, uint8 frames [S, H, W, 3]) -> features [S, ...]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/afil-ray/features`` (``~/.cache/afil-ray/features`` without it), as pip and HF do."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "afil-ray" / "features"


def frames_key(frames: np.ndarray) -> str:
    """A hash of the frames' shape, type and bytes: equal frames, equal key."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{frames.shape}|{frames.dtype.str}|".encode())
    h.update(np.ascontiguousarray(frames).data)
    return h.hexdigest()


class FrameFeatureCache:
    """``wrap(encode)`` returns an encoder that reads ``root/<encoder_id>/<frames key>.npy`` when it exists and
    writes it when it does not; ``hits`` and ``misses`` count frames."""

    def __init__(self, root: str | os.PathLike[str], encoder_id: str) -> None:
        self.dir = Path(root).expanduser() / encoder_id
        self.hits = self.misses = 0

    def path(self, frames: np.ndarray) -> Path:
        return self.dir / f"{frames_key(frames)}.npy"

    def wrap(self, encode: FrameEncoder) -> FrameEncoder:
        def cached(camera: str, frames: np.ndarray) -> np.ndarray:
            path = self.path(frames)
            features = self._read(path, len(frames))
            if features is not None:
                self.hits += len(frames)
                return features
            features = encode(camera, frames)
            self._write(path, features)
            self.misses += len(frames)
            return features

        return cached

    def _read(self, path: Path, num_frames: int) -> np.ndarray | None:
        try:
            features = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError) as e:  # damaged: encode again (the new file replaces it)
            log.warning("feature cache file %s is unreadable (%s); encoding its frames again", path, e)
            return None
        if len(features) != num_frames:
            log.warning("feature cache file %s holds %d rows for %d frames; encoding them again", path,
                        len(features), num_frames)
            return None
        return features

    def _write(self, path: Path, features: np.ndarray) -> None:
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                np.save(f, features, allow_pickle=False)
            os.replace(tmp, path)
        except OSError as e:  # a full or read-only disk costs the next stage the encoding, not this one its run
            log.warning("cannot write feature cache file %s (%s); training goes on without it", path, e)
            tmp.unlink(missing_ok=True)
