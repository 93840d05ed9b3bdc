"""The rollout store and the teacher cache: formats, manifests, writers, readers, verify and stats.

    from grpo_kd.cache import RolloutRecord, write_rollout_shard, RolloutStore      # rollout phase / readers
    from grpo_kd.cache import CacheSpec, ScoredRows, TeacherShardSink              # teacher pass
    from grpo_kd.cache import CacheReader, CacheBatch                              # update phase

See docs/cache.md for the layout, the formats and the atomicity rules.
"""

from grpo_kd.cache.manifest import CacheError, describe_vocab, write_index
from grpo_kd.cache.reader import CacheBatch, CacheReader, completion_hidden
from grpo_kd.cache.rollouts import GroupSlice, RolloutRecord, RolloutStore, write_rollout_shard
from grpo_kd.cache.teacher import CacheSpec, ScoredRows, TeacherShardSink, open_teacher_shards

__all__ = [
    "CacheBatch", "CacheError", "CacheReader", "CacheSpec", "GroupSlice", "RolloutRecord", "RolloutStore",
    "ScoredRows", "TeacherShardSink", "completion_hidden", "describe_vocab", "open_teacher_shards",
    "write_index", "write_rollout_shard",
]
