"""The rollout store and the teacher cache: formats, manifests, writers, readers, verify and stats.

    grpo_kd.cache.rollouts     RolloutRecord, write_rollout_shard, RolloutStore       rollout phase / readers
    grpo_kd.cache.spec         CacheSpec, ScoredRows, the format protocols            what a teacher shard holds
    grpo_kd.cache.teacher      TeacherShardSink, open_teacher_shards                  teacher pass / readers
    grpo_kd.cache.reader       CacheReader, CacheBatch                                update phase
    grpo_kd.cache.manifest     shard manifests, checksums, vocabulary comparison

The package imports nothing itself, so that the light modules (manifests, specs) do not pull in torch.
See docs/cache.md for the layout, the formats and the atomicity rules.
"""
