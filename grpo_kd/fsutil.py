"""Atomic file writes, checksums and UTF-8 text: a killed process never leaves a file that looks finished.

This is the project's one writer of finished files. Every output — checkpoints, manifests, cache shards,
rollouts, kept batches, evaluation reports, the tiny models — is written to `<name>.tmp-<pid>` beside its final
name, made durable (fsync of every file written, then of the temporary directory), renamed over the final name
(atomic on POSIX within one file system), and the rename itself made durable (fsync of the parent directory).
A crash at any point leaves either the old file or the new one, never a mix; a failed attempt removes its
temporary. tests/test_fsutil.py checks both, and that no other module renames files.

    with atomic_path("out/part-00000.arrow") as tmp:      # a file, or a directory the block creates
        write_everything_to(tmp)

A directory of files (a checkpoint) carries its own checksums: `write_checksums(tmp)` inside the block records
the sha256 of every file in `checksums.json`, and `verify_checksums(dir)` refuses a file that changed since.
`read_text_utf8` is how every text input (configs, prompts, corpora) is read: undecodable bytes are one line
naming the file and the line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from grpo_kd.errors import GrpoKdError

CHECKSUMS_NAME = "checksums.json"  # the sha256 of every file of a directory output (a checkpoint), inside it


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


# ---------------------------------------------------------------------------------------------- directory checksums


class ChecksumMismatch(GrpoKdError):
    """A file whose bytes differ from the sha256 recorded when it was written (damaged or replaced since)."""


def write_checksums(directory: str | os.PathLike) -> Path:
    """Record the sha256 of every file below `directory` in `directory/checksums.json` (call it last, inside the
    `atomic_path` block that writes the directory, so the checksums arrive with the files)."""
    root = Path(directory)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != CHECKSUMS_NAME)
    sums = {str(p.relative_to(root)): sha256_file(p) for p in files}
    path = root / CHECKSUMS_NAME
    path.write_text(json.dumps({"sha256": sums}, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def verify_checksums(path: str | os.PathLike) -> int:
    """Check the files of `path` against the `checksums.json` of `path` or of its parent (a checkpoint's `model/`
    is covered by the checkpoint's list); returns how many files were checked (0: no list, an older or foreign
    directory). Raises `ChecksumMismatch` naming the first file that is missing or differs."""
    path = Path(path)
    root = path if (path / CHECKSUMS_NAME).is_file() else path.parent
    manifest = root / CHECKSUMS_NAME
    if not manifest.is_file():
        return 0
    try:
        sums = json.loads(manifest.read_text(encoding="utf-8"))["sha256"]
    except (ValueError, KeyError, TypeError):
        raise ChecksumMismatch(f"{manifest}: not a readable checksum list (damaged)") from None
    prefix = path.relative_to(root)
    checked = 0
    for name, digest in sorted(sums.items()):
        file = root / name
        if prefix.parts and Path(name).parts[: len(prefix.parts)] != prefix.parts:
            continue
        if not file.is_file():
            raise ChecksumMismatch(f"{file} is missing (listed in {manifest})")
        if sha256_file(file) != digest:
            raise ChecksumMismatch(f"{file} does not match the sha256 recorded in {manifest} (damaged or changed "
                                   "since it was written)")
        checked += 1
    return checked


# ---------------------------------------------------------------------------------------------- text


def read_text_utf8(path: str | os.PathLike) -> str:
    """A text file's content, decoded as UTF-8 with universal newlines (as `Path.read_text`). A file that is not
    UTF-8 text (another encoding, a binary file) raises one `GrpoKdError` naming the file, the line and the byte."""
    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise GrpoKdError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at column {column}); "
                          "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise GrpoKdError(f"{path}:{line}: a NUL byte: a binary file, not text")
    return text.replace("\r\n", "\n").replace("\r", "\n")
