"""Helpers of the fault tests: the tiny loop's config, running it in this process, damaging files."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "grpo_kd" / "assets" / "builtin_corpus.txt"


def make_config(output_dir: Path, models, **sections):
    """The tiny loop's config (validated as a user's file is), with `sections` merged in (dotted overrides)."""
    from grpo_kd.config import load_config

    overrides = [
        "name=run", f"output_dir={output_dir}", "iterations=1", "seed=3",
        f"model.path={models.student}", f"teacher.path={models.teacher}", "teacher.top_k=8",
        f"data.prompts={CORPUS}", "data.format=text", "data.prefix_words=4",
        "rollout.prompts_per_iteration=8", "rollout.group_size=4", "rollout.max_new_tokens=10",
        "rollout.batch_size=8", "optim.lr=1e-3", "optim.micro_batch_size=8", "optim.epochs_per_iteration=1",
    ]
    overrides += [f"{key}={value}" for key, value in sections.items()]
    return load_config(None, overrides)


def run_all(cfg, iterations: int | None = None) -> None:
    """Every unfinished phase of `cfg`'s chain, in this process (what `grpo-kd run --in-process` runs)."""
    from rich.console import Console

    from grpo_kd.slurm.local import run_local
    from grpo_kd.slurm.plan import prepare_run

    cfg, paths = prepare_run(cfg, iterations)
    run_local(cfg, paths, console=Console(stderr=True, quiet=True), in_process=True)


def flip_bit(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x10
    path.write_bytes(bytes(data))


def set_list_value(path: Path, column: str, value: float, *, update_manifest: bool = True) -> None:
    """Set the first float of list column `column` of an Arrow shard to `value`, as a writer that produced it
    would have: the file rewritten, and (`update_manifest`) its manifest's sha256 recomputed to match."""
    import hashlib
    import json

    import pyarrow as pa

    table = pa.ipc.open_file(pa.BufferReader(path.read_bytes())).read_all()  # in memory: the file is rewritten
    index = table.schema.get_field_index(column)
    array = table.column(column).combine_chunks()
    values = array.values.to_numpy(zero_copy_only=False).copy()
    values[0] = value
    table = table.set_column(index, table.schema.field(index),
                             pa.ListArray.from_arrays(array.offsets, pa.array(values, array.type.value_type)))
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    if update_manifest:
        manifest = path.with_name(path.name.split(".")[0] + ".manifest.json")
        data = json.loads(manifest.read_text())
        data["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        data["bytes"] = path.stat().st_size
        manifest.write_text(json.dumps(data))


def weights(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "model" / "model.safetensors"))
