"""Loading the run configuration: defaults, then a YAML file, then dotted overrides, validated as one mapping.

Validation is driven by the schema's type annotations (schema.py), so a field is declared once. An unknown key
or a value of the wrong type raises `ConfigError` with one line that names the dotted key and, for a typo, the
nearest valid key; a key of an earlier layout names the key that replaced it. The cross-field rules run last,
in `rules.check`, which every entry point shares.

    cfg = load_config("configs/grpo.yaml", ["loss.policy.beta=0.04", "rollout.group_size=8"])
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from grpo_kd.config import rules
from grpo_kd.config.schema import ALGORITHM_DEFAULTS, Config, ConfigError, LossConfig
from grpo_kd.fsutil import atomic_write_text, read_text_utf8

# ---------------------------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                check_rules: bool = True) -> Config:
    """Defaults, then the YAML file (if any), then `key.sub=value` overrides, validated as one mapping, then the
    rules on its values (`rules.check`; `check_rules=False` for a caller that lists every problem itself)."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(path)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    add_algorithm_defaults(raw)
    cfg = from_dict(Config, raw)
    check_loss_sections(raw, cfg)
    if check_rules:
        rules.check(cfg)
    return cfg


def add_algorithm_defaults(raw: dict[str, Any]) -> None:
    """Put the chosen algorithm's own defaults (schema.ALGORITHM_DEFAULTS) beneath what `raw` sets."""
    loss = raw.get("loss", {})
    if not isinstance(loss, dict):
        return  # from_dict reports it
    for key, value in ALGORITHM_DEFAULTS.get(loss.get("algorithm", LossConfig.algorithm), {}).items():
        *sections, name = key.split(".")
        node = loss
        for section in sections:
            node = node.get(section, {}) if isinstance(node, dict) else None
        if isinstance(node, dict) and name in node:
            continue
        set_dotted(raw, f"loss.{key}", value)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(read_text_utf8(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, not {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """`loss.policy.beta=0.04` -> ("loss.policy.beta", 0.04); the value is read as YAML, so lists and null work."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type, raw: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, checking every key and value against the annotations."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [key for key in raw if key not in names]
    if unknown:
        key = str(unknown[0])
        renamed = getattr(cls, "RENAMED", {})
        if key in getattr(cls, "REMOVED", {}):
            raise ConfigError(f"config key {prefix}{key} was removed: {cls.REMOVED[key]}")
        if key in renamed:
            raise ConfigError(f"config key {prefix}{key} has moved: use {renamed[key]}")
        near = difflib.get_close_matches(key, names + list(renamed), n=1, cutoff=0.6)
        where = (renamed[near[0]] if near[0] in renamed else prefix + near[0]) if near else None
        hint = f"; did you mean {where}?" if where else f"; valid keys: {', '.join(names)}"
        raise ConfigError(f"unknown config key {prefix}{key}{hint}")
    values = {name: _coerce(hints[name], raw[name], f"{prefix}{name}") for name in names if name in raw}
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key + ".")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {_describe(value)} matches none of {hint}")
    if origin is Literal:
        if value in args:
            return value
        near = difflib.get_close_matches(str(value), [str(a) for a in args], n=1, cutoff=0.5)
        hint_text = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}{hint_text}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_describe(value)}")
        return [_coerce(args[0], item, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_describe(value)}")
        return {_coerce(args[0], k, f"{key}") : _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    return _coerce_scalar(hint, value, key)


def _coerce_scalar(hint: Any, value: Any, key: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads `3e-3` (no dot) as a string
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (dict, list)):  # `key={prompt}` on the command line is a YAML mapping
            raise ConfigError(f"{key}: expected str, got {_describe(value)}; text with braces or brackets must be "
                              f"quoted, e.g. {key}='\"{{prompt}}\"' on the command line")
    else:
        raise TypeError(f"config field {key} has an unsupported annotation {hint!r}")
    raise ConfigError(f"{key}: expected {hint.__name__}, got {_describe(value)}")


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _describe(value: Any) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"


def check_loss_sections(raw: dict[str, Any], cfg: Config) -> None:
    """Refuse a loss section the chosen algorithm does not read (its settings would be silently ignored)."""
    given = raw.get("loss") or {}
    wanted = cfg.loss.sections
    for key, value in given.items():
        if isinstance(value, dict) and key not in wanted:
            reads = ", ".join(f"loss.{name}" for name in wanted)
            raise ConfigError(f"loss.{key} is not read by loss.algorithm={cfg.loss.algorithm}, which reads {reads}; "
                              f"remove loss.{key}")


# ---------------------------------------------------------------------------------------------- output


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data; the loss keeps only the sections its algorithm reads."""
    data = dataclasses.asdict(cfg)
    if isinstance(cfg, Config):
        loss = data["loss"]
        data["loss"] = {"algorithm": loss["algorithm"], **{name: loss[name] for name in cfg.loss.sections}}
    return data


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write_text(path, to_yaml(cfg))
