"""grpo-kd's rollout sampler against transformers' `generate()`: completion tokens per second, side by side.

    python benchmarks/bench_rollout.py --threads 1 --repeats 3 --workdir /tmp/br

The medium scale of bench_trl.py: its student (4 layers x 256, vocabulary about 10.6k from the Faroese text and the
built-in corpus), 16 prompts x G=8 = 128 rows in one batch, 128 new tokens, temperature 1, no top-k / top-p
truncation, float32 on the CPU. Two students of that shape: bench_trl's own with random weights, which almost
never samples the eos (every row runs to the limit: this measures decoding alone), and one pre-trained
`--pretrain-steps` steps on paragraphs of the same text (2-8 lines each, an eos after each paragraph), whose
completions end at varied lengths, many before the limit (where rows that finished cost the old sampler as much as
the rows still going).

Methods, each measured in its own fresh process, interleaved repeat by repeat:

    generate            transformers' model.generate(do_sample=True, temperature, top_k=0, top_p=1.0,
                        max_new_tokens, eos_token_id, pad_token_id) over the same left-padded rows, default KV cache
    generate+logprobs   the same, then the behaviour log-probs of the completions from one forward (log-softmax of
                        the full logits, 16 rows at a time): what a generate() user runs to get them
    sampler             grpo_kd.train.sampling.sample_batch on the same rows (per-row seeds), finished rows dropped
    sampler-all         the same with no row ever dropped (COMPACT_FRACTION = inf): the sampler before this change
    rollout             the `grpo-kd rollout` phase: sampling plus the recompute of the behaviour log-probs (one
                        forward through the fused kernels), i.e. its generation time (model loading excluded)
    rollout-loop        the same with rollout.recompute_logprobs=false: the sampling loop's own log-probs

Tokens are completion tokens (up to and including the eos). A process warms up on one short batch, then times
`--iterations` batches (other seeds each) and reports their median; a rollout method times one phase per process.
Each batch is timed in wall seconds and in the process's CPU seconds: with one thread (`--threads 1`) the CPU time
is the compute the method needed, which the load of a shared machine changes far less than the wall time. The
figure of a method is the median over `--repeats` processes. Writes benchmarks/results/<device>/rollout.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

RESULT_MARK = "BENCH_ROLLOUT_RESULT "
METHODS = ("generate", "generate+logprobs", "sampler", "sampler-all", "rollout", "rollout-loop")
LABELS = {"generate": "transformers generate()", "generate+logprobs": "generate() + a log-prob forward",
          "sampler": "grpo-kd sampler (finished rows dropped)", "sampler-all": "grpo-kd sampler, no row dropped (before)",
          "rollout": "`grpo-kd rollout` (sampling + log-prob recompute)",
          "rollout-loop": "`grpo-kd rollout`, recompute_logprobs=false"}


def _rows(spec: dict, tokenizer) -> list[list[int]]:
    from grpo_kd.data import encode_prompt

    prompts = [json.loads(line)["prompt"] for line in Path(spec["prompts_file"]).read_text().splitlines()]
    ids = [encode_prompt(tokenizer, text, chat_template=False) for text in prompts]
    return [p for p in ids for _ in range(spec["group_size"])]  # rows: each prompt G times, as the rollout lays out


def _count(completion: list[int], eos: set[int]) -> int:
    """Completion tokens up to and including the first eos."""
    for i, token in enumerate(completion):
        if token in eos:
            return i + 1
    return len(completion)


def _generate(model, tokenizer, rows, spec, max_new_tokens: int, seed: int, logprobs: bool = False) -> int:
    import torch

    from grpo_kd.train.sampling import left_pad

    input_ids, mask = left_pad(rows, tokenizer.pad_token_id)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=spec["temperature"],
                             top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        counts = [_count(row, {tokenizer.eos_token_id}) for row in out[:, input_ids.shape[1]:].tolist()]
        if logprobs:  # the behaviour log-probs of every completion token, 16 rows at a time
            width = input_ids.shape[1]
            full_mask = torch.cat([mask, torch.ones_like(out[:, width:])], dim=1)  # (R, P + N)
            for start in range(0, len(out), 16):
                ids, m = out[start : start + 16], full_mask[start : start + 16]
                logits = model(input_ids=ids, attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp(min=0)).logits
                logp = torch.log_softmax(logits[:, width - 1 : -1].float() / spec["temperature"], -1)  # (16, N, V)
                logp.gather(-1, ids[:, width:, None])  # (16, N, 1)
    return sum(counts)


def _sample(model, tokenizer, rows, spec, max_new_tokens: int, seed: int) -> int:
    from grpo_kd.train.sampling import SamplingParams, sample_batch

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=spec["temperature"])
    samples = sample_batch(model, rows, [seed * 100_003 + r for r in range(len(rows))], params,
                           eos_ids={tokenizer.eos_token_id}, pad_id=tokenizer.pad_token_id)
    return sum(len(s.completion_ids) for s in samples)


def _rollout(spec: dict, run_dir: Path, recompute: bool) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, tokens) of the phase's sampling and recording (its `sample_groups`)."""
    from grpo_kd.config import load_config
    from grpo_kd.train import rollout
    from grpo_kd.train.rollout import rollout_shard

    cpu = []
    sample_groups = rollout.sample_groups

    def timed(*args, **kwargs):
        start = time.process_time()
        try:
            return sample_groups(*args, **kwargs)
        finally:
            cpu.append(time.process_time() - start)

    rollout.sample_groups = timed

    cfg = load_config(None, [
        f"name={run_dir.name}", f"output_dir={run_dir.parent}", "iterations=1", f"model.path={spec['student']}",
        "model.device=cpu", "model.dtype=float32", f"data.prompts={spec['prompts_file']}",
        "data.heldout_fraction=0.0", f"rollout.prompts_per_iteration={spec['prompts']}",
        f"rollout.group_size={spec['group_size']}", f"rollout.max_new_tokens={spec['max_new_tokens']}",
        f"rollout.batch_size={spec['prompts']}", f"rollout.temperature={spec['temperature']}",
        f"rollout.recompute_logprobs={str(recompute).lower()}",
    ])  # fmt: skip
    summary = rollout_shard(cfg, 1)
    return summary.seconds, cpu[0], summary.tokens


def worker(method: str, spec: dict) -> dict:
    """One process: load, warm up, time. Returns {"seconds", "tokens"} (medians over the timed batches)."""
    import torch

    from grpo_kd.models import load_causal_lm, load_tokenizer
    from grpo_kd.train import sampling

    torch.set_num_threads(spec["threads"])
    tokenizer = load_tokenizer(spec["student"])
    model = load_causal_lm(spec["student"], dtype="float32", device="cpu", vocab_size=len(tokenizer)).eval()
    rows = _rows(spec, tokenizer)
    if method == "sampler-all":
        sampling.COMPACT_FRACTION = float("inf")
    def run(max_new_tokens: int, seed: int) -> int:
        if method.startswith("generate"):
            return _generate(model, tokenizer, rows, spec, max_new_tokens, seed, logprobs=method.endswith("logprobs"))
        return _sample(model, tokenizer, rows, spec, max_new_tokens, seed)

    run(8, seed=10_000)  # warm-up: first-call costs of torch and the library
    if method.startswith("rollout"):
        run_dir = Path(spec["workdir"]) / f"rollout-{os.getpid()}"
        seconds, cpu, tokens = _rollout(spec, run_dir, recompute=method == "rollout")
        return {"seconds": seconds, "cpu_seconds": cpu, "tokens": tokens}
    times, cpus, counts = [], [], []
    for i in range(spec["iterations"]):
        start, start_cpu = time.perf_counter(), time.process_time()
        counts.append(run(spec["max_new_tokens"], seed=i))
        times.append(time.perf_counter() - start)
        cpus.append(time.process_time() - start_cpu)
    return {"seconds": statistics.median(times), "cpu_seconds": statistics.median(cpus),
            "tokens": statistics.median(counts)}


def measure(method: str, spec: dict, log: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"]),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, json.dumps(spec)]
    load = os.getloadavg()[0]
    with open(log, "a") as handle:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=handle, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"bench_rollout: {method} failed (exit {done.returncode}); see {log}")
    line = next(line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK))
    result = json.loads(line[len(RESULT_MARK):])
    return {**result, "tokens_per_s": result["tokens"] / result["seconds"],
            "tokens_per_cpu_s": result["tokens"] / result["cpu_seconds"], "load1": load}


def build_students(work: Path, pretrain_steps: int, seed: int) -> dict[str, Path]:
    """{"random": bench_trl's medium student, "pretrained": the same shape pre-trained on the same corpus}."""
    from bench_trl import FAROESE, build_models

    from grpo_kd.tiny import BUILTIN_CORPUS, build_tiny_models, corpus_texts
    from grpo_kd.tiny_families import TinyArch

    medium = build_models(work, "medium", seed)
    build = json.loads((medium.student.parent / "build.json").read_text())
    arch = {role: build["params"][f"{role}_arch"] for role in ("teacher", "student")}
    lines = corpus_texts(sorted(FAROESE.glob("*.conllu")) + [BUILTIN_CORPUS])
    sizes = random.Random(seed).choices(range(2, 9), k=len(lines))
    paragraphs, start = [], 0
    for size in sizes:
        if start >= len(lines):
            break
        paragraphs.append(" ".join(lines[start : start + size]))
        start += size
    corpus = work / "paragraphs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in paragraphs), encoding="utf-8")
    trained = build_tiny_models(
        work / "models-medium-pretrained", [corpus], vocab_size=16384,
        pretrain_steps=0, student_pretrain_steps=pretrain_steps, seed=seed,
        teacher_arch=TinyArch(**arch["teacher"]), student_arch=TinyArch(**arch["student"]),
    )  # fmt: skip
    return {"random": medium.student, "pretrained": trained.student}


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# Rollout sampling: grpo-kd vs transformers generate() ({report['device']})", "",
             f"Command: `{report['command']}`", "",
             f"transformers {report['versions']['transformers']}, torch {report['versions']['torch']} "
             f"({s['threads']} thread{'s' if s['threads'] != 1 else ''} per process), {report['cpus']} CPUs, float32. {s['prompts']} prompts x G={s['group_size']} "
             f"= {s['prompts'] * s['group_size']} rows in one batch, {s['max_new_tokens']} new tokens, temperature "
             f"{s['temperature']}, no truncation. Each figure: median over {report['repeats']} fresh processes of "
             f"the median of {s['iterations']} timed batches after a warm-up (rollout: one phase per process).", ""]
    for student, results in report["results"].items():
        lines += [f"## {student} student: {report['students'][student]}", "",
                  "| method | tokens / CPU s | vs generate() | tokens / s (wall) | vs generate() | CPU s / batch "
                  "| wall s / batch (range) | completion tokens / batch |", "|---|---|---|---|---|---|---|---|"]
        base, base_wall = results["generate"]["tokens_per_cpu_s"], results["generate"]["tokens_per_s"]
        for method in METHODS:
            m = results[method]
            lines.append(f"| {LABELS[method]} | {m['tokens_per_cpu_s']:.0f} | {m['tokens_per_cpu_s'] / base:.2f}x | "
                         f"{m['tokens_per_s']:.0f} | {m['tokens_per_s'] / base_wall:.2f}x | {m['cpu_seconds']:.2f} | "
                         f"{m['seconds']:.2f} ({m['seconds_min']:.2f}-{m['seconds_max']:.2f}) | {m['tokens']:.0f} |")
        lines.append("")
    load = report["load1"]
    lines.append(f"1-minute load average at the starts: min {min(load):.1f}, median {statistics.median(load):.1f}, "
                 f"max {max(load):.1f} (the machine is shared with other work).")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=Path("runs/bench-rollout"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)

    import torch
    import transformers
    from bench_trl import write_prompts

    from grpo_kd.kernels.bench_report import device_slug

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    write_prompts(work / "prompts.jsonl", args.prompts)
    students = build_students(work, args.pretrain_steps, args.seed)
    settings = {"prompts": args.prompts, "group_size": args.group_size, "max_new_tokens": args.max_new_tokens,
                "temperature": args.temperature, "iterations": args.iterations, "threads": args.threads}
    runs: dict[str, dict[str, list[dict]]] = {name: {m: [] for m in METHODS} for name in students}
    for repeat in range(args.repeats):
        for name, student in students.items():
            for method in METHODS:
                spec = {**settings, "student": str(student), "prompts_file": str(work / "prompts.jsonl"),
                        "workdir": str(work)}
                result = measure(method, spec, work / "bench_rollout.log")
                runs[name][method].append(result)
                print(f"repeat {repeat + 1}/{args.repeats} {name:10s} {method:17s} {result['tokens_per_cpu_s']:6.0f} "
                      f"tokens/CPU s {result['tokens_per_s']:6.0f} tokens/s ({result['tokens']:.0f} tokens in "
                      f"{result['seconds']:.2f} s, {result['cpu_seconds']:.2f} CPU s)", flush=True)
    keys = ("tokens_per_s", "tokens_per_cpu_s", "seconds", "cpu_seconds", "tokens")
    results = {name: {m: {**{k: statistics.median(r[k] for r in rs) for k in keys},
                          "seconds_min": min(r["seconds"] for r in rs), "seconds_max": max(r["seconds"] for r in rs)}
                      for m, rs in methods.items()} for name, methods in runs.items()}
    report = {
        "command": "python benchmarks/bench_rollout.py " + " ".join(argv), "device": device_slug("cpu"),
        "cpus": os.cpu_count(), "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "settings": settings, "repeats": args.repeats, "results": results, "runs": runs,
        "students": {name: _describe(path) for name, path in students.items()},
        "load1": [r["load1"] for methods in runs.values() for rs in methods.values() for r in rs],
    }
    out = args.out / report["device"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "rollout.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "rollout.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def _describe(student: Path) -> str:
    build = json.loads((student.parent / "build.json").read_text())
    info = build["student"]
    return (f"{info['parameters']:,} parameters ({info['arch']['num_layers']} layers x {info['arch']['hidden_size']}), "
            f"{info['pretrain_steps']} pre-training steps, vocabulary {build['vocab_size']:,}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(RESULT_MARK + json.dumps(worker(sys.argv[2], json.loads(sys.argv[3]))), flush=True)
        raise SystemExit(0)
    raise SystemExit(main(sys.argv[1:]))
