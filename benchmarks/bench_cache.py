"""Teacher-cache formats side by side: Arrow IPC (default) vs Zarr v3, in one run on one machine.

    python benchmarks/bench_cache.py [--rows 512] [--seq 512] [--out benchmarks/results]

Measures, for each format:
  - bytes per completion token on disk, for k in {32, 64, 128} (float16 log-probs, sampled-token and reference
    log-probs included, no m samples);
  - write throughput (tokens/s) through `TeacherShardSink` (temporary name, rename, sha256, manifest), in
    teacher-pass batches of 16 rows x 512 tokens;
  - the latency of one random training batch, 64 sequences x 512 tokens at k=64 (16 groups of 4), through
    `CacheReader.batch` (rollout fields too, padded torch tensors), from page cache (files read once first).
The data is synthetic but shaped like a teacher's: top-k ids drawn Zipf-like from a 262,144-token vocabulary
(frequent tokens have small ids, as in BPE vocabularies), log-probs the sorted logs of a peaked Dirichlet.
Zarr's compression ratio therefore only indicates what real caches get. Results go to
<out>/<device>/cache.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from grpo_kd.cache.reader import CacheReader
from grpo_kd.cache.rollouts import RolloutRecord, RolloutStore, write_rollout_shard
from grpo_kd.cache.spec import CacheSpec, ScoredRows
from grpo_kd.cache.teacher import TeacherShardSink
from grpo_kd.kernels.bench_report import device_slug
from grpo_kd.paths import RunPaths

VOCAB = 262_144
GROUP = 4
BATCH_ROWS = 64
TEACHER_BATCH_ROWS = 16
# A plausible teacher-pass rate to compare the write rate with: a 27B teacher's forward is ~54 GFLOP/token;
# one H100 (989 TFLOP/s dense bf16) at 40% utilisation scores ~7,300 tokens/s. A 70B teacher is slower.
TEACHER_TOKENS_PER_S = 7_300


def make_rollouts(run: Path, rows: int, seq: int) -> None:
    rng = np.random.default_rng(0)
    records = [RolloutRecord(prompt_id=f"p{i // GROUP}", group_id=i // GROUP, sample_index=i % GROUP,
                             prompt_ids=rng.integers(0, VOCAB, 64).tolist(),
                             completion_ids=rng.integers(0, VOCAB, seq).astype(np.int32),
                             old_logprobs=-rng.random(seq).astype(np.float32), finish_reason="length",
                             prompt_text="p", completion_text="c")
               for i in range(rows)]
    write_rollout_shard(RunPaths.of(run).rollouts(1), 0, records, meta={})


def synthetic_scores(rows: np.ndarray, seq: int, k: int, rng) -> ScoredRows:
    n = len(rows) * seq
    ids = np.minimum(rng.zipf(1.3, size=(n, k)), VOCAB - 1).astype(np.int32)  # (n, k) Zipf-like token ids
    probs = rng.dirichlet(np.full(k + 1, 0.3), size=n)[:, :k]  # (n, k) a peaked distribution + rest mass
    logprobs = np.sort(np.log(np.maximum(probs, 1e-30)), axis=1)[:, ::-1].astype(np.float32)
    token = {"topk_ids": ids, "topk_logprobs": logprobs.astype(np.float16),
             "target_logprobs": logprobs[:, 0].copy(), "ref_logprobs": logprobs[:, 1].copy()}
    seq_lp = logprobs[:, 0].reshape(len(rows), seq).astype(np.float64).sum(1)
    return ScoredRows(rows.astype(np.int64), rows // GROUP, np.full(len(rows), seq, np.int32), seq_lp, token)


def write_cache(run: Path, fmt: str, k: int, rows: int, seq: int) -> dict:
    spec = CacheSpec(format=fmt, top_k=k, reference=True)
    teacher_dir = RunPaths.of(run).teacher(1)
    shutil.rmtree(teacher_dir, ignore_errors=True)
    rng = np.random.default_rng(k)
    batches = [synthetic_scores(part, seq, k, rng) for part in np.array_split(np.arange(rows), rows // TEACHER_BATCH_ROWS)]
    store = RolloutStore.open(RunPaths.of(run).rollouts(1))
    manifest = {"rollouts": {"sha256": store.shards[0].manifest["sha256"]}}
    started = time.perf_counter()
    with TeacherShardSink(teacher_dir, 0, spec, total_rows=rows, total_tokens=rows * seq, manifest=manifest) as sink:
        for scored in batches:
            sink.add(scored)
    seconds = time.perf_counter() - started
    size = sum(p.stat().st_size for p in teacher_dir.rglob("part-00000.*") if p.is_file()) if fmt == "arrow" else \
        sum(p.stat().st_size for p in (teacher_dir / "part-00000.zarr").rglob("*") if p.is_file())
    return {"format": fmt, "k": k, "bytes_per_token": size / (rows * seq), "write_tokens_per_s": rows * seq / seconds,
            "write_seconds": seconds}


def read_latency(run: Path, repeats: int) -> dict:
    paths = RunPaths.of(run)
    for p in paths.root.rglob("*"):  # into the page cache
        if p.is_file():
            p.read_bytes()
    reader = CacheReader.open(paths.rollouts(1), paths.teacher(1))
    rng = np.random.default_rng(1)
    reader.batch(rng.choice(reader.num_groups, BATCH_ROWS // GROUP, replace=False).tolist())  # warm-up
    times = []
    for _ in range(repeats):
        groups = rng.choice(reader.num_groups, BATCH_ROWS // GROUP, replace=False).tolist()
        started = time.perf_counter()
        batch = reader.batch(groups)
        times.append((time.perf_counter() - started) * 1e3)
    assert tuple(batch.teacher_topk_ids.shape) == (BATCH_ROWS, batch.completion_ids.shape[1], 64)
    times.sort()
    return {"read_ms_median": statistics.median(times), "read_ms_p90": times[int(0.9 * (len(times) - 1))],
            "read_ms_min": times[0]}


def markdown(report: dict) -> str:
    lines = [f"# Teacher cache: Arrow vs Zarr ({report['device']})", "", f"Command: `{report['command']}`", "",
             f"{report['rows']} rows x {report['seq']} tokens per shard; read = one random batch of "
             f"{BATCH_ROWS} x {report['seq']} tokens at k=64 through `CacheReader.batch`, from page cache.", "",
             "| format | k | bytes/token | write tokens/s | write vs 27B teacher pass | read batch median ms | p90 ms |",
             "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        read = (f"{r['read_ms_median']:.1f} | {r['read_ms_p90']:.1f}" if "read_ms_median" in r else "- | -")
        lines.append(f"| {r['format']} | {r['k']} | {r['bytes_per_token']:.1f} | {r['write_tokens_per_s']:,.0f} | "
                     f"{r['write_tokens_per_s'] / TEACHER_TOKENS_PER_S:.0f}x | {read} |")
    lines += ["", f"Teacher-pass reference rate: {TEACHER_TOKENS_PER_S:,} tokens/s (27B teacher, one H100, 40% MFU)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    device = device_slug("cpu")
    report = {"device": device, "cpus": os.cpu_count(), "rows": args.rows, "seq": args.seq,
              "command": "python " + " ".join(sys.argv), "teacher_tokens_per_s": TEACHER_TOKENS_PER_S, "results": []}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        run = Path(tmp) / "run"
        make_rollouts(run, args.rows, args.seq)
        for fmt in ("arrow", "zarr"):
            for k in (32, 64, 128):
                result = write_cache(run, fmt, k, args.rows, args.seq)
                if k == 64:
                    result.update(read_latency(run, args.repeats))
                report["results"].append(result)
                print(json.dumps(result), flush=True)
    out = args.out / device
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "cache.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
