"""The run configuration: the schema (schema.py), loading and saving (loader.py), the rules (rules.py).

    from grpo_kd.config import Config, load_config
    cfg = load_config("configs/grpo.yaml", ["loss.policy.beta=0.04", "rollout.group_size=8"])
"""

from grpo_kd.config.loader import from_dict, load_config, parse_override, read_yaml, save_config, to_dict, to_yaml
from grpo_kd.config.schema import (
    ALGORITHM_DEFAULTS,
    ALGORITHM_SECTIONS,
    ALGORITHMS,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    GrpoConfig,
    LossConfig,
    MiniLLMConfig,
    ModelConfig,
    OptimConfig,
    PolicyLossConfig,
    PpoConfig,
    PretrainConfig,
    RewardConfig,
    RolloutConfig,
    SftConfig,
    SlurmConfig,
    SlurmPhaseConfig,
    TeacherConfig,
    TeacherKLConfig,
    TrackingConfig,
)

__all__ = [
    "ALGORITHMS", "ALGORITHM_DEFAULTS", "ALGORITHM_SECTIONS", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "EvalConfig",
    "GrpoConfig", "LossConfig", "MiniLLMConfig", "ModelConfig", "OptimConfig", "PolicyLossConfig", "PpoConfig",
    "PretrainConfig", "RewardConfig", "RolloutConfig", "SftConfig", "SlurmConfig", "SlurmPhaseConfig", "TeacherConfig",
    "TeacherKLConfig", "TrackingConfig", "from_dict", "load_config", "parse_override", "read_yaml", "save_config",
    "to_dict", "to_yaml",
]
