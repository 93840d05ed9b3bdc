"""What the checksum reads cost: every shard reader and checkpoint loader checks sha256 before use (issue 13).

    python benchmarks/bench_checksums.py --repeats 5          # the medium scale of bench_trl.py (~3 min, 2 cores)

Builds (or reuses) bench_trl.py's `--scale medium` models (random-weight Llamas, vocabulary ~11k, teacher
6 x 384, student 4 x 256), runs two iterations of the loop at that benchmark's settings (16 prompts x G=4, 96
new tokens, k=16) in this process (the second loads the first's checkpoint), and then measures, side by side and interleaved repeat by repeat, each reader with
its checksum check and without it:

    rollouts     the shard's sha256 (what RolloutStore.open adds), beside RolloutStore.open(verify=False)
    teacher      the shard's sha256 (what open_teacher_shards adds), beside open_teacher_shards(verify=False)
    checkpoint   verify_checksums of its model/ (what loading the student adds) beside load_student itself, and of
                 the optimizer files (what restore_checkpoint adds)

and the phases' own wall times, so that the cost reads as a share of an iteration (`grpo-kd run`'s "done"
test, plan.damaged_outputs, reads the same two files again, only when it resumes an iteration whose update is not
done). The files are hot in the page cache (just written): the figures are sha256's CPU cost, the floor; a cold
read from a network file system adds the read itself, which the phase would pay anyway on its first pass over
the data. A large file (256 MiB) is hashed too, for sha256's throughput on this CPU (to scale the figures to a
real cache).

Writes benchmarks/results/<device>/checksums.{json,md} with this command.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: stable figures on a shared machine)")
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-trl")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from bench_trl import Settings, build_models, grpokd_config, write_prompts

    from grpo_kd.cache.manifest import checksum
    from grpo_kd.cache.rollouts import RolloutStore
    from grpo_kd.cache.teacher import open_teacher_shards
    from grpo_kd.fsutil import sha256_file, verify_checksums
    from grpo_kd.kernels.bench_report import device_slug
    from grpo_kd.models import load_student
    from grpo_kd.paths import PHASES
    from grpo_kd.slurm.plan import prepare_run
    from grpo_kd.train.phases import run_phase

    work = args.workdir.resolve()
    models = build_models(work, "medium", 0)
    write_prompts(work / "prompts-checksums.jsonl", 16)
    s = Settings(scale="medium", max_new_tokens=96, models=str(models.student.parent),
                 prompts_file=str(work / "prompts-checksums.jsonl"), workdir=str(work))
    run_dir = work / "checksums" / "run"
    shutil.rmtree(run_dir.parent, ignore_errors=True)  # the phases are timed: none may be done already
    cfg, paths = prepare_run(grpokd_config(s, run_dir, 2))
    phases = {}
    for iteration in (1, 2):  # iteration 2 loads iteration 1's checkpoint: the checkpoint reads are real
        for phase in PHASES:
            phases[f"{phase} {iteration}"] = run_phase(cfg, phase, iteration, show_progress=False).seconds
    rollouts, teacher, checkpoint = paths.rollouts(2), paths.teacher(2), paths.checkpoint(1)
    cases = {
        "rollouts: open without its checksum": lambda: RolloutStore.open(rollouts, verify=False),
        "rollouts: the checksum (sha256 of the shard)": lambda: checksum(rollouts / "part-00000.arrow"),
        "teacher: open without its checksum": lambda: open_teacher_shards(teacher, verify=False),
        "teacher: the checksum (sha256 of the shard)": lambda: checksum(teacher / "part-00000.arrow"),
        "checkpoint: load_student (its weights' check included)": lambda: load_student(
            cfg.model, checkpoint=str(checkpoint)),
        "checkpoint: the weights' check (verify_checksums of model/)": lambda: verify_checksums(checkpoint / "model"),
        "checkpoint: the optimizer files' check": lambda: [verify_checksums(checkpoint / name) for name in
                                                           ("optimizer.safetensors", "optimizer.json")],
    }
    times = {name: [] for name in cases}
    for _ in range(args.repeats):  # interleaved: the machine's load falls on every case alike
        for name, fn in cases.items():
            times[name] += timed(fn, 3 if name.startswith("checkpoint") else 10)  # ms-scale reads: 10 each
    big = work / "sha256-throughput.bin"
    big.write_bytes(os.urandom(256 << 20))
    sha_s = statistics.median(timed(lambda: sha256_file(big), 3))
    big.unlink()
    sizes = {"rollouts": tree_bytes(rollouts / "part-00000.arrow"), "teacher": tree_bytes(teacher / "part-00000.arrow"),
             "checkpoint": tree_bytes(checkpoint), "checkpoint model": tree_bytes(checkpoint / "model")}
    median = {name: statistics.median(values) for name, values in times.items()}
    # per iteration of `grpo-kd run`: the teacher pass opens the rollouts, the update opens rollouts and teacher
    # cache; the rollout and the update each load the previous checkpoint's weights, the update its optimizer
    per_iteration = (2 * median["rollouts: the checksum (sha256 of the shard)"]
                     + median["teacher: the checksum (sha256 of the shard)"]
                     + 2 * median["checkpoint: the weights' check (verify_checksums of model/)"]
                     + median["checkpoint: the optimizer files' check"])
    iteration_s = sum(v for k, v in phases.items() if k.endswith(" 2"))
    report = {
        "command": " ".join(["python benchmarks/bench_checksums.py", *argv]), "device": device_slug("cpu"),
        "threads": args.threads, "repeats": args.repeats, "settings": {"prompts": 16, "group_size": 4,
                                                                       "max_new_tokens": 96, "top_k": s.top_k},
        "bytes": sizes, "phases_s": phases, "median_s": median, "sha256_MB_per_s": 256 * 1.048576 / sha_s,
        "per_iteration_checksum_s": per_iteration, "iteration_s": iteration_s,
        "share_of_iteration": per_iteration / iteration_s,
    }
    out = args.out / report["device"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "checksums.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "checksums.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(r: dict) -> str:
    lines = [f"# Checksum reads at bench_trl's medium scale ({r['device']})", "", f"`{r['command']}`", "",
             f"{r['threads']} torch thread(s), medians over {r['repeats']} interleaved rounds (10 calls each per round "
             "for the shards, 3 for the checkpoint), files hot in the page "
             "cache (sha256's CPU cost; a cold read adds the I/O the phase pays on its first pass anyway).", "",
             "| file | bytes |", "|---|---|"]
    lines += [f"| {name} | {size:,} |" for name, size in r["bytes"].items()]
    lines += ["", "| measurement | median |", "|---|---|"]
    lines += [f"| {name} | {seconds * 1e3:.1f} ms |" for name, seconds in r["median_s"].items()]
    lines += [f"| sha256 of a 256 MiB file | {r['sha256_MB_per_s']:.0f} MB/s |", "",
              "| phase (iteration 1, 2) | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.2f} |" for name, seconds in r["phases_s"].items()]
    lines += ["", f"Checksum reads of one iteration of `grpo-kd run` (the rollouts twice, the teacher cache once, "
              f"the previous checkpoint's weights twice and its optimizer once): "
              f"{r['per_iteration_checksum_s'] * 1e3:.1f} ms of an iteration's "
              f"{r['iteration_s']:.1f} s ({100 * r['share_of_iteration']:.2f} %).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
