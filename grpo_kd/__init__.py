"""grpo-kd: on-policy distillation of large language models into smaller ones, through an on-disk teacher cache.

The loop is three file-to-file phases (rollout, cache-teacher, update); see README.md and docs/.
"""

__version__ = "0.1.0"
