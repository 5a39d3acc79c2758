"""Arrow replay store: episodes as rows, sharded by task and outcome."""

from afil_ray.replay.episode import OUTCOMES, Episode, episodes_to_table, table_to_episodes
from afil_ray.replay.maintenance import PartitionStats, format_stats
from afil_ray.replay.sampler import WindowSampler
from afil_ray.replay.shard_io import CorruptShard, ShardCorruptError, ShardFile
from afil_ray.replay.store import ReplayStore, ReplayWriter

__all__ = [
    "OUTCOMES",
    "CorruptShard",
    "Episode",
    "PartitionStats",
    "ReplayStore",
    "ReplayWriter",
    "ShardCorruptError",
    "ShardFile",
    "WindowSampler",
    "episodes_to_table",
    "format_stats",
    "table_to_episodes",
]
