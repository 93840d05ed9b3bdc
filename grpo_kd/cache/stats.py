"""`grpo-kd cache stats`: what a teacher cache holds and how much of the teacher it keeps.

Per iteration, over all teacher shards:
- bytes per token: shard bytes on disk / completion tokens (and per row field group, nominally);
- top-k mass: m = sum_i exp(topk_logprob_i), the share of the teacher's probability inside the top-k, as a
  histogram and quantiles (a low mass means top-k alone is a poor picture of the teacher: raise k or use m>0);
- teacher entropy, estimated from the top-k with the rest mass r = 1 - m:
      H_low  = -sum_i p_i log p_i - r log r                  (the rest as one bucket: a lower bound)
      H_high = H_low + r log(V - k)                          (the rest spread evenly: an upper bound)
  The true entropy lies between the two; they meet as r -> 0;
- agreement: the share of the student's sampled tokens equal to the teacher's top-1, and inside its top-k;
- the teacher's mean log-prob of the sampled tokens;
- for a teacher of another vocabulary (an aligned cache): its log-prob per byte, per teacher token and per student
  token, the share of student token boundaries that a teacher token straddles (the byte where the student token
  starts lies inside a teacher token: its value is then paid by a later student token), teacher tokens and bytes
  per student token, and the share of student tokens that hold no teacher token (value 0).
Writes `cache_stats_iter_XXXX.json` and a PNG plot beside it (matplotlib, Agg backend) under RUN/reports/.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from grpo_kd.cache.manifest import CacheError
from grpo_kd.cache.rollouts import RolloutStore
from grpo_kd.cache.spec import stored_logprobs_as_float32
from grpo_kd.cache.teacher import check_alignment, open_teacher_shards
from grpo_kd.cache.verify import iterations_of
from grpo_kd.fsutil import atomic_savefig, atomic_write_json
from grpo_kd.paths import RunPaths, iteration_name

QUANTILES = [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99]
MASS_BINS = np.linspace(0.0, 1.0, 21)


def iteration_stats(paths: RunPaths, iteration: int) -> dict:
    store = RolloutStore.open(paths.rollouts(iteration))  # both check every file's checksum first
    shards = open_teacher_shards(paths.teacher(iteration))
    check_alignment(store, shards)
    spec = shards[0].spec
    vocab = int(shards[0].manifest.get("teacher", {}).get("tokenizer", {}).get("vocab_size") or 0)
    total_bytes = sum(int(s.manifest["bytes"]) for s in shards)
    tokens = sum(int(s.manifest["tokens"]) for s in shards)
    out: dict = {"iteration": iteration, "format": spec.format, "top_k": spec.top_k, "num_samples": spec.num_samples,
                 "logprob_dtype": spec.logprob_dtype, "token_level": spec.token_level, "shards": len(shards),
                 "rows": sum(int(s.manifest["rows"]) for s in shards), "tokens": tokens, "bytes": total_bytes,
                 "bytes_per_token": total_bytes / max(tokens, 1)}
    mass, h_low, h_high, target, top1, in_topk, seq, aligned = ([] for _ in range(8))
    for shard in shards:
        rollout = store.shard(shard.shard)
        offsets, completion = rollout.list_column("completion_ids")
        for chunk in shard.reader.iter_token_chunks(list(spec.token_fields())):
            seq.append(chunk["seq_logprob"])
            if spec.alignment is not None:
                aligned.append(chunk)
            if not spec.token_level:
                continue
            top = chunk["topk_logprobs"]
            top = stored_logprobs_as_float32(top).astype(np.float64)
            p = np.exp(top)  # (N, k)
            m = p.sum(axis=1)
            rest = np.clip(1.0 - m, 0.0, 1.0)
            with np.errstate(divide="ignore", invalid="ignore"):
                rest_term = np.where(rest > 0, -rest * np.log(rest), 0.0)
            low = -(p * top).sum(axis=1) + rest_term
            mass.append(m)
            h_low.append(low)
            h_high.append(low + rest * np.log(max(vocab - spec.top_k, 1)))
            target.append(chunk["target_logprobs"])
            sampled = np.concatenate([completion[offsets[r]:offsets[r + 1]] for r in chunk["row"]])
            top1.append(chunk["topk_ids"][:, 0] == sampled)
            in_topk.append((chunk["topk_ids"] == sampled[:, None]).any(axis=1))
    seq = np.concatenate(seq)
    if spec.token_level:
        mass, h_low, h_high = np.concatenate(mass), np.concatenate(h_low), np.concatenate(h_high)
        target = np.concatenate(target).astype(np.float64)
        counts, _ = np.histogram(np.clip(mass, 0, 1), bins=MASS_BINS)
        out["topk_mass"] = {"mean": float(mass.mean()), "quantiles": _quantiles(mass),
                            "histogram": {"bin_edges": MASS_BINS.tolist(), "counts": counts.tolist()}}
        out["entropy_nats"] = {"lower_mean": float(h_low.mean()), "upper_mean": float(h_high.mean()),
                               "lower_quantiles": _quantiles(h_low), "vocab_size": vocab,
                               "estimate": "from top-k: rest as one bucket (lower) / spread evenly (upper)"}
        out["agreement"] = {"student_token_is_teacher_top1": float(np.concatenate(top1).mean()),
                            "student_token_in_teacher_topk": float(np.concatenate(in_topk).mean())}
        out["teacher_logprob_of_sampled"] = {"mean": float(target.mean()), "quantiles": _quantiles(target)}
        out["_plot"] = (mass, h_low, target)
    else:
        out["alignment"] = _alignment_stats(aligned, seq, spec.alignment)
        values = np.concatenate([c["target_logprobs"] for c in aligned]).astype(np.float64)
        out["teacher_logprob_of_sampled"] = {"mean": float(values.mean()) if len(values) else 0.0,
                                             "quantiles": _quantiles(values)}
        out["_plot"] = (None, None, values)
    return out


def _alignment_stats(chunks: list[dict], seq: np.ndarray, rule: str) -> dict:
    """What the byte alignment of a teacher with another vocabulary looks like over the iteration."""
    cat = lambda name: np.concatenate([c[name] for c in chunks]).astype(np.int64)  # noqa: E731
    n_bytes, n_teacher, students = cat("xtok_num_bytes").sum(), cat("xtok_num_tokens").sum(), cat("num_tokens").sum()
    covering = cat("xtok_bytes") > 0  # student tokens with bytes of their own (a boundary where they start)
    straddled = cat("xtok_straddled")
    return {"rule": rule, "straddled_boundary_share": float(straddled[covering].mean()) if covering.any() else 0.0,
            "student_tokens_holding_no_teacher_token": float((cat("xtok_teacher_tokens") == 0).mean())
            if students else 0.0,
            "teacher_tokens_per_student_token": float(n_teacher / max(students, 1)),
            "bytes_per_student_token": float(n_bytes / max(students, 1)),
            "logprob_per_byte": float(seq.sum() / max(n_bytes, 1)),
            "logprob_per_teacher_token": float(seq.sum() / max(n_teacher, 1)),
            "logprob_per_student_token": float(seq.sum() / max(students, 1))}


def _quantiles(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {}
    return {f"q{int(q * 100):02d}": float(v) for q, v in zip(QUANTILES, np.quantile(values, QUANTILES))}


def plot_stats(stats: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mass, h_low, target = stats["_plot"]
    panels = [(mass, "top-k probability mass", MASS_BINS), (h_low, "teacher entropy, lower bound (nats)", 30),
              (target, "teacher log-prob of the sampled token", 40)]
    panels = [p for p in panels if p[0] is not None]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4))
    axes = np.atleast_1d(axes)
    for ax, (values, title, bins) in zip(axes, panels):
        ax.hist(values, bins=bins, color="#4472c4")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("tokens")
    what = f"k={stats['top_k']}" if stats["token_level"] else "aligned onto the student's tokens"
    fig.suptitle(f"{iteration_name(stats['iteration'])}: teacher cache, {what}, "
                 f"{stats['bytes_per_token']:.0f} B/token", fontsize=10)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def summary_line(stats: dict) -> str:
    what = f"k={stats['top_k']}" if stats["token_level"] else "no top-k"
    head = (f"{iteration_name(stats['iteration'])}: {stats['tokens']} tokens, {stats['bytes_per_token']:.1f} bytes/token "
            f"({stats['format']}, {what})")
    if stats["token_level"]:
        return (head + f"; top-k mass median {stats['topk_mass']['quantiles'].get('q50', float('nan')):.3f}; "
                f"entropy {stats['entropy_nats']['lower_mean']:.2f}-{stats['entropy_nats']['upper_mean']:.2f} nats; "
                f"top-1 agreement {stats['agreement']['student_token_is_teacher_top1']:.3f}")
    a = stats["alignment"]
    return (head + f"; teacher of another vocabulary, aligned ({a['rule']}): log-prob per byte "
            f"{a['logprob_per_byte']:.3f}, straddled student boundaries {a['straddled_boundary_share']:.3f}")


def run_stats(run_dir: str | Path, iteration: int | None = None, out_dir: str | Path | None = None):
    """Yield (json path, png path, one-line summary) per iteration with a teacher cache."""
    paths = RunPaths.of(run_dir)
    if not paths.root.is_dir():
        raise CacheError(f"run directory not found: {run_dir}")
    iterations = [iteration] if iteration is not None else [
        i for i in iterations_of(paths.root) if paths.teacher(i).is_dir()]
    if not iterations:
        raise CacheError(f"no teacher caches under {run_dir}")
    out = Path(out_dir) if out_dir else paths.reports
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for it in iterations:
        stats = iteration_stats(paths, it)
        json_path = out / f"cache_stats_{iteration_name(it)}.json"
        png_path = json_path.with_suffix(".png")
        plot_stats(stats, png_path)
        stats.pop("_plot")
        atomic_write_json(json_path, stats)
        results.append((json_path, png_path, summary_line(stats)))
    return results
