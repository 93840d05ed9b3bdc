"""Atomic file writes and checksums: a killed process never leaves a file that looks finished.

This is the project's one writer of finished files. Every output — checkpoints, manifests, cache shards,
rollouts, kept batches, evaluation reports, the tiny models — is written to `<name>.tmp-<pid>` beside its final
name, made durable (fsync of every file written, then of the temporary directory), renamed over the final name
(atomic on POSIX within one file system), and the rename itself made durable (fsync of the parent directory).
A crash at any point leaves either the old file or the new one, never a mix; a failed attempt removes its
temporary. tests/test_fsutil.py checks both, and that no other module renames files.

    with atomic_path("out/part-00000.arrow") as tmp:      # a file, or a directory the block creates
        write_everything_to(tmp)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator


def tmp_path_for(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; make it durable and rename it to `path` only if the block finishes
    without error. The block may create a file or a directory there. An existing file at `path` is replaced in
    one rename; an existing directory (which cannot be renamed over) is first moved aside to `<name>.old-<pid>`
    and deleted after the new one is in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    remove_path(tmp)  # a leftover of an earlier process with this pid
    try:
        yield tmp
        fsync_tree(tmp)
        _rename_over(tmp, path)
        fsync_dir(path.parent)
    finally:
        remove_path(tmp)


def _rename_over(tmp: Path, path: Path) -> None:
    if not (path.is_dir() and not path.is_symlink()):
        os.replace(tmp, path)
        return
    old = path.with_name(f"{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)  # the new directory did not arrive: put the old one back
        raise
    remove_path(old)


def remove_path(path: Path) -> None:
    """Delete a file or a directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def fsync_tree(path: Path) -> None:
    """fsync a file, or every file of a directory tree and the directories themselves."""
    if path.is_dir():
        for root, _dirs, files in os.walk(path):
            for name in files:
                _fsync_file(Path(root) / name)
            fsync_dir(Path(root))
    elif path.is_file():
        _fsync_file(path)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def fsync_dir(directory: Path) -> None:
    """Make renames inside `directory` durable (best effort: not every file system can fsync a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def atomic_savefig(fig, path: str | os.PathLike, **savefig_kwargs: Any) -> Path:
    """Save a matplotlib figure as a PNG, atomically; the caller closes the figure."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", **savefig_kwargs)
    return path


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(path: str | os.PathLike) -> str:
    """Checksum of a directory (a Zarr store): file names and contents, in sorted order."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(root)).encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()
