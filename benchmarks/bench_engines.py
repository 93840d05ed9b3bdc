"""Rollout and teacher-pass throughput with each engine, transformers ("hf") and vLLM, side by side in one run.

    python benchmarks/bench_engines.py --preset cpu                      # the CPU figures in results/<cpu>/
    python benchmarks/bench_engines.py --preset gpu-7b                   # a GPU machine (benchmarks/gpu_engines.sh)
    python benchmarks/bench_engines.py --model-dir PATH --tokenizer PATH # a real checkpoint instead of a preset

Same model, prompts and settings for both engines; each measurement is its own process (its own imports,
memory and threads). What is measured, in completion tokens per second:
  - rollout: the real rollout phase (`rollout_shard`): G completions per prompt sampled, then the behaviour
    log-probs recomputed by `policy.py` (both engines do that recompute; vLLM's sampling alone is shown too);
    the model load / engine start is excluded and shown apart;
  - teacher pass: the real scorer of `cache-teacher` (`_teacher_scorer`: top-k log-probs, sampled-token
    log-probs) over the transformers engine's rollouts, both engines scoring the very same rows; the load /
    engine start is excluded and shown apart; the reference pass is off.
Presets build a random-weight Llama of the shape named (weights random: every completion runs to
max_new_tokens, so both engines produce the same number of tokens) with a byte-level BPE tokenizer padded to the
preset's vocabulary: cpu (hidden 1024, 12 layers, head 64, vocab 32000: 0.2B parameters), gpu-7b (Llama-2-7B's
shape), gpu-27b (Gemma-3-27B's text shape as a Llama: 62 layers, hidden 5376, vocab 262144; about 54 GB of
bf16 weights on disk). Results go to <out>/<device>/engines-<preset>.{json,md} with this command.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = {  # hidden, layers, heads, kv heads, head dim, intermediate, vocab
    "cpu": (1024, 12, 16, 8, 64, 2816, 32000),
    "gpu-7b": (4096, 32, 32, 32, 128, 11008, 32000),
    "gpu-27b": (5376, 62, 32, 16, 128, 21504, 262144),
}


def build_model(preset: str, out: Path) -> Path:
    """A random-weight Llama of the preset's shape with a padded byte-level BPE tokenizer (reused when built)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from grpo_kd.tiny import corpus_texts, train_tokenizer

    if (out / "config.json").is_file():
        return out
    hidden, layers, heads, kv, head_dim, inter, vocab = PRESETS[preset]
    tokenizer = train_tokenizer(corpus_texts(), 2048)
    tokenizer.add_tokens([f"<x{i}>" for i in range(vocab - len(tokenizer))])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                         intermediate_size=inter, max_position_embeddings=1024, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    gpu = preset.startswith("gpu")
    torch.manual_seed(0)
    with torch.device("cuda" if gpu else "cpu"):
        torch.set_default_dtype(torch.bfloat16 if gpu else torch.float32)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def config_for(args, model: Path, tokenizer: Path, engine: str, name: str):
    from grpo_kd.config import load_config

    return load_config(None, [
        f"name={name}", f"output_dir={args.work / 'runs'}", f"model.path={model}", f"model.tokenizer={tokenizer}",
        f"teacher.path={model}", f"data.prompts={args.work / 'prompts.txt'}", "data.format=text",
        "data.heldout_fraction=0.0", f"data.heldout_prompts={args.work / 'prompts.txt'}",
        f"rollout.prompts_per_iteration={args.prompts}", f"rollout.group_size={args.group_size}",
        f"rollout.max_new_tokens={args.max_new_tokens}", f"rollout.batch_size={args.prompts}",
        f"teacher.top_k={args.top_k}", "teacher.reference=false", f"teacher.token_budget={args.token_budget}",
        f"rollout.engine={engine}", f"teacher.engine={engine}",
    ])


# ---------------------------------------------------------------------------------------------- workers


def rollout_worker(args) -> dict:
    from grpo_kd.cache.manifest import read_json, shard_manifest_path
    from grpo_kd.paths import RunPaths
    from grpo_kd.train.rollout import rollout_shard

    cfg = config_for(args, args.model, args.tokenizer, args.engine, f"rollout-{args.engine}")
    started = time.perf_counter()
    summary = rollout_shard(cfg, 1)
    wall = time.perf_counter() - started
    meta = read_json(shard_manifest_path(RunPaths.of(cfg.run_dir).rollouts(1), 0))["meta"]
    work = meta["generation_seconds"]  # sampling + behaviour log-prob recompute
    out = {"tokens": summary.tokens, "seconds": work, "tokens_per_s": summary.tokens / work,
           "start_seconds": wall - work, "drift": meta["logprob_drift"]}
    if "sampling_seconds" in meta:
        out["sampling_tokens_per_s"] = summary.tokens / meta["sampling_seconds"]
    return out


def teacher_worker(args) -> dict:
    from grpo_kd.cache.rollouts import RolloutStore
    from grpo_kd.models import load_tokenizer, tokenizer_fingerprint
    from grpo_kd.paths import RunPaths
    from grpo_kd.train import teacher_pass as T

    cfg = config_for(args, args.model, args.tokenizer, args.engine, "rollout-hf")  # the hf rollouts
    paths = RunPaths.of(cfg.run_dir)
    store = RolloutStore.open(paths.rollouts(1))
    tokenizer = load_tokenizer(str(args.tokenizer))
    fingerprint = tokenizer_fingerprint(tokenizer)
    spec = T._cache_spec(cfg, fingerprint, fingerprint)
    started = time.perf_counter()
    with T._teacher_scorer(cfg, paths, 1, tokenizer, spec, store.shards) as (scorer, _):
        loaded = time.perf_counter()
        tokens = sum(int(scored.num_tokens.sum()) for shard in store.shards
                     for _, scored, _ in scorer.score_shard(shard, None, progress=False))
        work = time.perf_counter() - loaded
    return {"tokens": tokens, "seconds": work, "tokens_per_s": tokens / work, "start_seconds": loaded - started}


def run_worker(args, phase: str, engine: str) -> dict:
    command = [sys.executable, __file__, "--worker", phase, "--engine", engine, *args.passthrough]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if "Error" in line][-5:]  # vLLM's root cause
        raise SystemExit(f"{phase}/{engine} failed:\n" + "\n".join(errors) + f"\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- report


def write_report(args, results: dict, parameters: int, device: str, command: str) -> Path:
    out = args.out / device
    out.mkdir(parents=True, exist_ok=True)
    report = {"command": command, "device": device, "preset": args.preset, "model": str(args.model),
              "parameters": parameters, "threads": args.threads, "prompts": args.prompts,
              "group_size": args.group_size, "max_new_tokens": args.max_new_tokens, "top_k": args.top_k,
              "load_average": args.load, "results": results}
    (out / f"engines-{args.preset}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Rollout and teacher pass: transformers vs vLLM ({device})", "", f"Command: `{command}`", "",
             f"Model: {parameters / 1e6:.0f}M parameters ({args.preset}), {args.prompts} prompts x "
             f"{args.group_size} completions x {args.max_new_tokens} new tokens, teacher top-k {args.top_k}, "
             f"{args.threads} threads; 1-minute load average {args.load[0]:.1f} at the start, {args.load[1]:.1f} at "
             "the end (other work on the machine slows both engines; compare them within one run).", "",
             "| phase | engine | tokens | tokens/s (load excluded) | load / engine start (s) | note |",
             "|---|---|---|---|---|---|"]
    for phase in ("rollout", "teacher"):
        for engine in ("hf", "vllm"):
            r = results[phase][engine]
            note = ""
            if "sampling_tokens_per_s" in r:
                note = f"sampling alone {r['sampling_tokens_per_s']:.0f} tokens/s"
            if phase == "rollout":
                note += f"{'; ' if note else ''}|sampler - trainer| mean {r['drift']['mean_abs']:.1e}, " \
                        f"max {r['drift']['max_abs']:.1e}"
            lines.append(f"| {phase} | {engine} | {r['tokens']} | {r['tokens_per_s']:.1f} | "
                         f"{r['start_seconds']:.1f} | {note} |")
        ratio = results[phase]["vllm"]["tokens_per_s"] / results[phase]["hf"]["tokens_per_s"]
        lines.append(f"| {phase} | vllm / hf | | {ratio:.2f}x | | |")
    (out / f"engines-{args.preset}.md").write_text("\n".join(lines) + "\n")
    return out / f"engines-{args.preset}.md"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--model-dir", type=Path, help="a save_pretrained model instead of the preset's random one")
    p.add_argument("--tokenizer", type=Path, help="its tokenizer (default: the model directory)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--token-budget", type=int, default=8192)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-engines")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--worker", choices=["rollout", "teacher"], help=argparse.SUPPRESS)
    p.add_argument("--engine", choices=["hf", "vllm"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    args.work = args.work.absolute() / args.preset
    args.passthrough = list(argv)  # the parent's own arguments (it has no --worker), handed to its workers
    if args.worker:
        args.model = args.model_dir or args.work / "model"
        args.tokenizer = args.tokenizer or args.model
        worker = rollout_worker if args.worker == "rollout" else teacher_worker
        print(json.dumps(worker(args)))
        return 0
    import torch

    from grpo_kd.kernels.bench_report import device_slug

    if args.preset.startswith("gpu") and not torch.cuda.is_available():
        print(f"bench_engines: --preset {args.preset} measures on a CUDA GPU and there is none here", file=sys.stderr)
        return 1
    args.work.mkdir(parents=True, exist_ok=True)
    args.model = args.model_dir or build_model(args.preset, args.work / "model")
    args.tokenizer = args.tokenizer or args.model
    from grpo_kd.tiny import corpus_texts

    lines = [" ".join(t.split()[:8]) for t in corpus_texts() if len(t.split()) >= 8][: args.prompts]
    (args.work / "prompts.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    import shutil

    shutil.rmtree(args.work / "runs", ignore_errors=True)
    results: dict = {"rollout": {}, "teacher": {}}
    args.load = [os.getloadavg()[0]]
    for phase in ("rollout", "teacher"):  # the hf rollout first: the teacher pass of both engines scores it
        for engine in ("hf", "vllm"):
            results[phase][engine] = run_worker(args, phase, engine)
            print(f"{phase:8s} {engine:5s} {results[phase][engine]['tokens_per_s']:9.1f} tokens/s", flush=True)
    from grpo_kd.engines.vllm_engine import checkpoint_fingerprint

    args.load.append(os.getloadavg()[0])
    parameters = checkpoint_fingerprint(str(args.model))["num_parameters"]
    command = "python benchmarks/bench_engines.py " + " ".join(shlex.quote(a) for a in argv)
    device = device_slug("cuda" if torch.cuda.is_available() else "cpu")
    print(f"written: {write_report(args, results, parameters, device, command.strip())}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
