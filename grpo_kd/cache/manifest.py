"""Manifests of the rollout store and the teacher cache: one small JSON file per shard, plus a merged index.

Key design choice: **the per-shard manifest is the truth; `manifest.json` is only an index.** A SLURM array task
owns shard j and writes exactly two files of its own, each to a temporary name renamed when complete:

    part-0000J.arrow (or .zarr/)       the data
    part-0000J.manifest.json           what it was made from and with, its row/token counts and its sha256

The data file is renamed first, the manifest second, so a shard is finished exactly when its manifest exists and
the checksum in it matches the data. Every reader checks that checksum before it uses a shard
(`verify_shard_checksum`, one sequential read of the file) and refuses a damaged or swapped file with the command
that rebuilds it (`rebuild_command`). A killed writer leaves at most a `*.tmp-<pid>` leftover or a data file
without a manifest, neither of which looks finished. `manifest.json` (the merged list of shard manifests) is
written only by single-process steps (a one-shard writer, `grpo-kd cache verify`, the update phase), never by
two array tasks at once, and readers never depend on it: they always read the per-shard manifests.

Fingerprints (`{vocab_size, vocab_hash, name}` of a tokenizer, from `grpo_kd.models.tokenizer_fingerprint`) are
compared with `same_vocab` and described, in error messages, with `describe_vocab`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from grpo_kd.errors import GrpoKdError
from grpo_kd.fsutil import atomic_write_json, fsync_dir, remove_path, sha256_file, sha256_tree
from grpo_kd.paths import part_name

MANIFEST_VERSION = 1
INDEX_NAME = "manifest.json"
_SHARD_MANIFEST = re.compile(r"^part-(\d{5})\.manifest\.json$")


class CacheError(GrpoKdError):
    """A missing, unfinished, corrupt or mismatched rollout or teacher shard."""


# ----------------------------------------------------------------------------------------------- names


def shard_manifest_path(directory: Path, shard: int) -> Path:
    return Path(directory) / part_name(shard, "manifest.json")


def shard_data_path(directory: Path, shard: int, suffix: str) -> Path:
    return Path(directory) / part_name(shard, suffix)


def checksum(path: Path) -> str:
    """sha256 of a file, or of a directory tree (a Zarr store)."""
    return sha256_tree(path) if Path(path).is_dir() else sha256_file(path)


def size_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


# ----------------------------------------------------------------------------------------------- reading / writing


def write_shard_manifest(directory: Path, shard: int, manifest: dict[str, Any]) -> Path:
    """Write shard `shard`'s manifest atomically (call only after its data file was renamed into place)."""
    path = shard_manifest_path(directory, shard)
    atomic_write_json(path, {"version": MANIFEST_VERSION, "shard": shard, **manifest})
    return path


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CacheError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheError(f"{path}: not valid JSON ({exc})") from None


def list_shard_manifests(directory: Path) -> dict[int, dict[str, Any]]:
    """`{shard: manifest}` for every finished shard in `directory` (those whose manifest file exists)."""
    directory = Path(directory)
    found: dict[int, dict[str, Any]] = {}
    if not directory.is_dir():
        return found
    for path in sorted(directory.iterdir()):
        match = _SHARD_MANIFEST.match(path.name)
        if match:
            found[int(match.group(1))] = read_json(path)
    return found


def write_index(directory: Path, kind: str) -> Path:
    """Merge the per-shard manifests into `manifest.json` (single-process steps only; see the module doc)."""
    shards = list_shard_manifests(directory)
    index = {
        "version": MANIFEST_VERSION,
        "kind": kind,
        "num_shards": len(shards),
        "rows": sum(m.get("rows", 0) for m in shards.values()),
        "tokens": sum(m.get("tokens", 0) for m in shards.values()),
        "shards": [shards[j] for j in sorted(shards)],
    }
    path = Path(directory) / INDEX_NAME
    atomic_write_json(path, index)
    return path


def rebuild_command(directory: Path, shard: int) -> str:
    """The command that writes shard `shard` of a run's `iter_NNNN/rollouts` or `iter_NNNN/teacher` again."""
    directory = Path(directory)
    iteration = directory.parent.name
    if not re.fullmatch(r"iter_\d{4,}", iteration) or directory.name not in ("rollouts", "teacher"):
        return f"write shard {shard} of {directory} again"
    config = directory.parent.parent / "config.yaml"
    if directory.name == "rollouts":
        manifest = list_shard_manifests(directory).get(shard) or {}
        count = (manifest.get("meta") or {}).get("num_shards") or shard + 1
        phase = "rollout"
    else:  # task J of n scores rollout shards i with i % n == J: n = the rollout shard count gives shard J alone
        count = max(len(list_shard_manifests(directory.parent / "rollouts")), shard + 1)
        phase = "cache-teacher"
    return (f"grpo-kd {phase} --config {config} --iteration {int(iteration[5:])} --shard {shard} --num-shards "
            f"{count} (`grpo-kd run` redoes it too)")


def verify_shard_checksum(path: Path, manifest: dict[str, Any], shard: int) -> None:
    """Raise a one-line `CacheError` when the data file `path` of shard `shard` is not the file its manifest
    describes (a flipped bit, a file copied over it); the message names the file and the command that rebuilds it."""
    actual = checksum(path)
    if actual != manifest.get("sha256"):
        raise CacheError(f"{path} does not match the sha256 in its manifest (damaged or replaced since it was "
                         f"written: {actual[:12]} != {str(manifest.get('sha256'))[:12]}); rebuild it: "
                         f"{rebuild_command(Path(path).parent, shard)}")


def shard_is_complete(directory: Path, shard: int, suffix: str, *, verify_checksum: bool = True) -> bool:
    """True when shard `shard` has its manifest, its data file, and (optionally) a matching checksum."""
    manifest_path = shard_manifest_path(directory, shard)
    data = shard_data_path(directory, shard, suffix)
    if not manifest_path.is_file() or not data.exists():
        return False
    try:
        manifest = read_json(manifest_path)
    except CacheError:
        return False
    return not verify_checksum or manifest.get("sha256") == checksum(data)


def remove_shard(directory: Path, shard: int, *, keep: Path | None = None) -> None:
    """Delete every file of shard `shard` (finished or not) in `directory`: its manifest first, so that it stops
    looking finished, then its data. A writer about to replace the data file passes it as `keep`: the old data
    then stays intact until the new file is renamed over it (a crash in between leaves the old bytes, unlisted)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    prefix = part_name(shard, "")  # "part-0000J."
    manifest = shard_manifest_path(directory, shard)
    manifest.unlink(missing_ok=True)
    fsync_dir(directory)
    for path in directory.iterdir():
        if path.name.startswith(prefix) and path != keep:
            remove_path(path)


def tmp_leftovers(directory: Path) -> list[Path]:
    directory = Path(directory)
    return sorted(p for p in directory.iterdir() if ".tmp-" in p.name) if directory.is_dir() else []


# ----------------------------------------------------------------------------------------------- fingerprints


def describe_vocab(fingerprint: dict[str, Any] | None) -> str:
    """`name (V=32000, hash 1a2b3c4d)` for error messages."""
    if not fingerprint:
        return "an unknown vocabulary"
    name = fingerprint.get("name") or "tokenizer"
    return f"{name} (V={fingerprint.get('vocab_size')}, hash {str(fingerprint.get('vocab_hash', ''))[:8]})"


def same_vocab(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Two tokenizer fingerprints describe the same vocabulary (size and hash; the name does not matter)."""
    if not a or not b:
        return False
    return a.get("vocab_size") == b.get("vocab_size") and a.get("vocab_hash") == b.get("vocab_hash")


def check_same_vocab(cache_vocab: dict | None, student_vocab: dict | None, what: str) -> None:
    """Raise a one-line `CacheError` naming both vocabularies when they differ."""
    if not same_vocab(cache_vocab, student_vocab):
        raise CacheError(
            f"{what} was made with vocabulary {describe_vocab(cache_vocab)} but the student has "
            f"{describe_vocab(student_vocab)}; token-level teacher fields need one shared vocabulary"
        )
