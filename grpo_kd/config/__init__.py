"""The run configuration: the schema (schema.py), loading and saving (loader.py), the rules on its values
(rules.py; the files it names are checked by grpo_kd.train.preflight when work starts).

    from grpo_kd.config import Config, load_config
    cfg = load_config("configs/grpo.yaml", ["loss.policy.beta=0.04", "rollout.group_size=8"])
"""

from grpo_kd.config.loader import from_dict, load_config, parse_override, read_yaml, save_config, to_dict, to_yaml
from grpo_kd.config.rules import check, problems
from grpo_kd.config.schema import (
    ALGORITHM_DEFAULTS,
    ALGORITHM_SECTIONS,
    ALGORITHMS,
    REWARD_COMPONENTS,
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
    "ALGORITHMS", "ALGORITHM_DEFAULTS", "ALGORITHM_SECTIONS", "REWARD_COMPONENTS", "CheckpointConfig", "Config",
    "ConfigError", "DataConfig", "EvalConfig", "GrpoConfig", "LossConfig", "MiniLLMConfig", "ModelConfig",
    "OptimConfig", "PolicyLossConfig", "PpoConfig", "PretrainConfig", "RewardConfig", "RolloutConfig", "SftConfig",
    "SlurmConfig", "SlurmPhaseConfig", "TeacherConfig", "TeacherKLConfig", "TrackingConfig", "check", "from_dict",
    "load_config", "parse_override", "problems", "read_yaml", "save_config", "to_dict", "to_yaml",
]
