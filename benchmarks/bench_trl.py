"""grpo-kd against TRL's GRPOTrainer with a teacher-scoring reward (or, with `--peer distillation`, against
TRL's DistillationTrainer): wall time per iteration and peak memory.

    python benchmarks/bench_trl.py --threads 1           # 16 prompts x G=4, 32 new tokens, 3 repeats (~8 min, 2 cores)
    python benchmarks/bench_trl.py --prompts 8 --repeats 1 --iterations 2   # a quick look
    python benchmarks/bench_trl.py --scale medium --threads 2 --max-new-tokens 96 --repeats 2 --iterations 2

`--scale tiny` (default) is the tiny pair of the tests (vocabulary 1,024, 0.5M / 0.1M parameters, briefly
pre-trained); `--scale medium` builds larger random-weight Llamas (teacher 6 x 384, student 4 x 256) with the
largest vocabulary a byte-level BPE reaches on the local text (../shared/data/faroese plus the built-in corpus:
about 11k), where full-vocabulary logits start to weigh. Its results go to `trl-medium.{json,md}`.
`--pretrain-steps N` (medium) pre-trains both models first, so that the teacher is peaked as a real one is (a
random-weight teacher is nearly uniform over the vocabulary, which a top-k cache does not represent well).

`--threads N` sets OMP/MKL threads in every measured process (default: the library's, one per core). On a
machine shared with other work, torch's default threads oversubscribe the cores and the timings of both methods
scatter by 10x; one thread gives stable figures (the committed results use it).

The alternative a user would otherwise take is TRL's `GRPOTrainer` with a reward function that runs the teacher
on each completion and returns the mean teacher log-prob of its tokens: the same reward as grpo-kd's
`teacher_loglik`. Both get the same tiny teacher and student (`grpo_kd.tiny.build_tiny_models`, built once into
the work directory), the same prompts, group size, max new tokens, sampling temperature, learning rate
(constant), loss type, beta, clip epsilon, gradient clipping and completions per optimizer step, on the CPU in
float32. One iteration = sampling every group + scoring + the optimizer steps over them:

    grpo-kd (one process)   run_rollout -> run_teacher_pass -> run_update, in one Python process: the compute
    grpo-kd (CLI)           `python -m grpo_kd.cli.app rollout|cache-teacher|update ...`, three processes per
                            iteration, exactly what `grpo-kd run` executes: how grpo-kd really runs
    TRL                     GRPOTrainer.train(), one iteration = `steps_per_generation` optimizer steps (one
                            generation batch of prompts x G completions); callbacks stamp the step ends

Each measurement is its own fresh process (the CLI's phases are each their own process too), so neither method
pollutes the other's memory; the methods are interleaved repeat by repeat so that the load of the shared machine
falls on all of them alike. Inside a process the first `--warmup` iterations are dropped (the CLI run has no
warm-up: each of its phases is a fresh process, so `--cli-iterations` are all measured); the time of a process
is the median of its remaining iterations, and the reported figure the median over `--repeats` processes. Peak
memory is the process's RSS high-water mark (`ru_maxrss`; for the CLI, the largest of the three phases'), also
given above the RSS right after the imports. The 1-minute load average is sampled around every measurement.

`--peer distillation` swaps both sides for on-policy distillation: TRL's DistillationTrainer (beta=1, the reverse
KL) against grpo-kd's token-level reverse KL to a live teacher (`loss.algorithm: privileged`, `teacher.kind:
model`), and adds the exact reverse KL each final student reaches on held-out prompts (benchmarks/
trl_distill_peer.py says how each side is configured):

    python benchmarks/bench_trl.py --peer distillation --threads 1 --lr 2e-3 --top-k 128

Writes benchmarks/results/<device>/trl.{json,md} (device as in bench_kernels.py; `--peer distillation`:
trl-distill.{json,md}, at medium scale trl-distill-medium.{json,md}), each with this command.
Needs TRL (`pip install trl`; measured with trl 1.16.0); exits 2 with a message when it is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULT_MARK = "BENCH_TRL_RESULT "
PROMPT_WORDS = 4  # a prompt is the first words of a corpus line, as in `grpo-kd demo`
METHODS = ("trl", "grpo-kd", "grpo-kd-cli")
LABELS = {"trl": "TRL GRPOTrainer + teacher reward fn (1 process)",
          "grpo-kd": "grpo-kd, 3 phases in 1 process (compute)",
          "grpo-kd-cli": "grpo-kd CLI, 3 processes per iteration (as `grpo-kd run`)"}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What both methods share, plus where the models and prompts are."""

    prompts: int = 16  # prompts per iteration (all of the prompt set: every iteration sees every prompt)
    group_size: int = 4  # G
    max_new_tokens: int = 32
    lr: float = 1e-4
    beta: float = 0.04
    loss_type: str = "dapo"
    epsilon: float = 0.2
    temperature: float = 1.0
    micro_batch: int = 16  # completions per optimizer step
    top_k: int = 16  # k of grpo-kd's teacher cache (TRL keeps no cache)
    iterations: int = 3  # measured iterations per process
    warmup: int = 1  # iterations per process before the measured ones
    cli_iterations: int = 2  # measured iterations of the CLI run (no warm-up: every phase is a fresh process)
    seed: int = 0
    scale: str = "tiny"
    models: str = ""
    prompts_file: str = ""
    workdir: str = ""
    peer: str = "grpo"  # grpo: TRL's GRPOTrainer vs grpo-kd GRPO; distillation: trl_distill_peer.py
    keep_student: str = ""  # where a worker copies its final student (the distillation peer evaluates it)

    @property
    def steps_per_iteration(self) -> int:
        return self.prompts * self.group_size // self.micro_batch


# ----------------------------------------------------------------------------------------------- helpers


def rss_now() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def load1() -> float:
    return os.getloadavg()[0]


def grpokd_overrides(s: Settings, run_dir: Path) -> list[str]:
    """configs/tiny.yaml (GRPO) or the defaults (distillation) plus every setting that must match TRL's, stated
    explicitly; the loss is the peer's. The prompts are the JSONL rows' `prompt` field, whole, as TRL gets them."""
    if s.peer == "distillation":
        loss = _peer().GRPOKD_LOSS
    else:
        loss = ["loss.algorithm=grpo", "loss.reward.kind=teacher_loglik", f"loss.policy.beta={s.beta}",
                f"loss.policy.loss_type={s.loss_type}", f"loss.policy.epsilon_low={s.epsilon}",
                f"loss.policy.epsilon_high={s.epsilon}"]
    return loss + [
        f"name={run_dir.name}", f"output_dir={run_dir.parent}", f"seed={s.seed}", "iterations=1",
        f"model.path={s.models}/student", "model.device=cpu", "model.dtype=float32",
        f"teacher.path={s.models}/teacher", "teacher.dtype=float32", f"teacher.top_k={s.top_k}",
        f"data.prompts={s.prompts_file}", "data.format=jsonl", "data.prefix_words=0", "data.heldout_fraction=0.0",
        f"rollout.prompts_per_iteration={s.prompts}", f"rollout.group_size={s.group_size}",
        f"rollout.max_new_tokens={s.max_new_tokens}", f"rollout.batch_size={s.prompts}",
        f"rollout.temperature={s.temperature}", f"optim.lr={s.lr}", "optim.lr_schedule=constant",
        f"optim.micro_batch_size={s.micro_batch}", "optim.grad_accum=1", "optim.epochs_per_iteration=1",
        "optim.max_grad_norm=1.0", "optim.weight_decay=0.0",
    ]  # fmt: skip


def grpokd_config(s: Settings, run_dir: Path, iterations: int):
    from grpo_kd.config import load_config

    base = ROOT / "configs" / "tiny.yaml" if s.peer == "grpo" else None  # tiny.yaml's loss is GRPO's
    cfg = load_config(base, grpokd_overrides(s, run_dir))
    cfg.iterations = iterations
    return cfg


def split_iterations(stamps: list[float], warmup: int) -> list[float]:
    """Iteration boundaries (start, end of 1st, end of 2nd, ...) -> the durations after the warm-up ones."""
    return [b - a for a, b in zip(stamps[:-1], stamps[1:])][warmup:]


# ----------------------------------------------------------------------------------------------- workers


def worker_grpokd(s: Settings) -> dict:
    """The three phases one after another in this process, `warmup + iterations` times."""
    import grpo_kd.cache.reader  # noqa: F401  (imported lazily by the phases: counted in the library floor)
    import grpo_kd.models  # noqa: F401
    import grpo_kd.train.algorithms  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from grpo_kd.paths import PHASES, RunPaths
    from grpo_kd.train.phases import run_phase

    after_imports = rss_now()
    run_dir = Path(tempfile.mkdtemp(dir=s.workdir, prefix="grpokd-")) / "run"
    cfg = grpokd_config(s, run_dir, s.warmup + s.iterations)
    stamps, phases, tokens = [time.perf_counter()], [], []
    for it in range(1, s.warmup + s.iterations + 1):
        phases.append({phase: run_phase(cfg, phase, it, show_progress=False).seconds for phase in PHASES})
        stamps.append(time.perf_counter())
        tokens.append(json.loads((RunPaths.of(run_dir).rollouts(it) / "manifest.json").read_text())["tokens"])
    peak = rss_peak()  # before the copy below, which is no part of training
    if s.keep_student:
        shutil.copytree(RunPaths.of(run_dir).checkpoint(s.warmup + s.iterations) / "model", s.keep_student)
    shutil.rmtree(run_dir.parent, ignore_errors=True)
    return {"iteration_s": split_iterations(stamps, s.warmup), "phases_s": phases[s.warmup:],
            "completion_tokens": tokens[s.warmup:], "rss_after_imports": after_imports, "peak_rss": peak}


def teacher_reward(teacher, tokenizer, token_counts: list[int]):
    """What a TRL user writes: run the teacher on prompt + completion (full logits) and return the mean
    log-prob of the completion tokens. `token_counts` collects the completion tokens of each call."""
    import torch

    def teacher_loglik(prompts, completions, completion_ids, **kwargs):
        prompt_ids = tokenizer(prompts)["input_ids"]  # as TRL tokenises them (special tokens added)
        rows = [p + list(c) for p, c in zip(prompt_ids, completion_ids)]
        ids = torch.full((len(rows), max(map(len, rows))), tokenizer.pad_token_id)  # (B, T)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        with torch.no_grad():
            logits = teacher(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        logprobs = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1)
        token_counts.append(sum(len(c) for c in completion_ids))
        return [float(logprobs[i, len(p) - 1 : len(p) - 1 + len(c)].mean()) if len(c) else 0.0
                for i, (p, c) in enumerate(zip(prompt_ids, completion_ids))]

    return teacher_loglik


def iteration_clock(steps: int):
    """(a TrainerCallback, its stamps): the time at the start of training and after every `steps` optimizer steps,
    the iteration boundaries of both TRL peers (split_iterations turns them into durations)."""
    from transformers import TrainerCallback

    stamps: list[float] = []

    class IterationClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % steps == 0:
                stamps.append(time.perf_counter())

    return IterationClock(), stamps


def trl_settings(s: Settings, out_dir: str) -> dict:
    """The TRL training arguments both peers share, each matching grpo-kd's side (`grpokd_overrides`): CPU float32,
    no vLLM, no checkpointing or logging, the seed, `warmup + iterations` x `steps_per_iteration` optimizer steps of
    `micro_batch` completions, sampling, a constant lr, AdamW without decay, gradient clipping 1.0."""
    return dict(
        output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, use_vllm=False, gradient_checkpointing=False,
        report_to=[], save_strategy="no", logging_steps=10**6, disable_tqdm=True, dataloader_num_workers=0,
        seed=s.seed, max_steps=s.steps_per_iteration * (s.warmup + s.iterations),
        per_device_train_batch_size=s.micro_batch, gradient_accumulation_steps=1,
        max_completion_length=s.max_new_tokens, temperature=s.temperature, top_p=1.0, top_k=0, learning_rate=s.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, log_completions=False,
    )  # fmt: skip


def worker_trl(s: Settings) -> dict:
    """GRPOTrainer.train() for `warmup + iterations` generation batches; a callback stamps iteration ends."""
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (the library floor, as for grpo-kd)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    after_imports = rss_now()
    clock, stamps = iteration_clock(s.steps_per_iteration)
    tokenizer = AutoTokenizer.from_pretrained(f"{s.models}/student")
    teacher = AutoModelForCausalLM.from_pretrained(f"{s.models}/teacher", dtype=torch.float32).eval()
    prompts = [json.loads(line)["prompt"] for line in Path(s.prompts_file).read_text().splitlines()]
    out_dir = tempfile.mkdtemp(dir=s.workdir, prefix="trl-")
    args = GRPOConfig(
        **trl_settings(s, out_dir), num_generations=s.group_size, steps_per_generation=s.steps_per_iteration,
        num_iterations=1, beta=s.beta, loss_type=s.loss_type, epsilon=s.epsilon, scale_rewards="group",
    )
    token_counts: list[int] = []
    trainer = GRPOTrainer(model=f"{s.models}/student", reward_funcs=teacher_reward(teacher, tokenizer, token_counts),
                          args=args, train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer,
                          callbacks=[clock])  # fmt: skip
    trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"iteration_s": split_iterations(stamps, s.warmup), "completion_tokens": token_counts[s.warmup:],
            "rss_after_imports": after_imports, "peak_rss": rss_peak(),
            "reference_model": trainer.ref_model is not None}


def _peer():
    """The distillation peer's side (TRL's DistillationTrainer, the held-out evaluation, its report)."""
    import trl_distill_peer  # benchmarks/ is on sys.path (this script's folder)

    return trl_distill_peer


def worker_main(method: str, spec: str) -> None:
    s = Settings(**json.loads(spec))
    if method == "trl":
        result = _peer().worker_trl_distill(s) if s.peer == "distillation" else worker_trl(s)
    else:
        result = worker_grpokd(s)
    print(RESULT_MARK + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------- measuring


THREADS: int = 0  # --threads: OMP/MKL threads of every measured process; 0 = the library default


def child_env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    threads = {"OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)} if THREADS else {}
    return {**os.environ, **threads, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}


def run_timed(cmd: list[str], log_path: Path) -> tuple[int, float, int]:
    """Run `cmd` with output to `log_path`; (exit code, wall seconds, peak RSS bytes of that process)."""
    with open(log_path, "ab") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env())
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, seconds, usage.ru_maxrss * 1024


def measure_worker(method: str, s: Settings, log_path: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, json.dumps(dataclasses.asdict(s))]
    code, _, _ = run_timed(cmd, log_path)
    lines = log_path.read_text(errors="replace").splitlines()
    for line in reversed(lines):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    raise RuntimeError(f"{method} worker exited {code} without a result; last lines of {log_path}:\n"
                       + "\n".join(lines[-15:]))


def measure_cli(s: Settings, log_path: Path) -> dict:
    """`warmup + iterations` iterations as `grpo-kd run` executes them: one process per phase."""
    from grpo_kd.paths import PHASES
    from grpo_kd.slurm.plan import Step, phase_args, prepare_run

    run_dir = Path(tempfile.mkdtemp(dir=s.workdir, prefix="cli-")) / "run"
    _, paths = prepare_run(grpokd_config(s, run_dir, s.cli_iterations))
    iteration_s, phases, peaks = [], [], []
    for it in range(1, s.cli_iterations + 1):
        times = {}
        for phase in PHASES:
            cmd = [sys.executable, "-m", "grpo_kd.cli.app", *phase_args(Step(it, phase), paths.config)]
            code, times[phase], peak = run_timed(cmd, log_path)
            if code != 0:
                raise RuntimeError(f"grpo-kd {phase} (iteration {it}) exited {code}; see {log_path}")
            peaks.append({"phase": phase, "peak_rss": peak})
        iteration_s.append(sum(times.values()))
        phases.append(times)
    tokens = [json.loads((paths.rollouts(it) / "manifest.json").read_text())["tokens"]
              for it in range(1, s.cli_iterations + 1)]
    shutil.rmtree(run_dir.parent, ignore_errors=True)
    top = max(peaks, key=lambda p: p["peak_rss"])
    return {"iteration_s": iteration_s, "phases_s": phases, "completion_tokens": tokens,
            "peak_rss": top["peak_rss"], "peak_phase": top["phase"]}


def measure(method: str, s: Settings, logs: Path, repeat: int) -> dict:
    before = load1()
    log_path = logs / f"{method}-{repeat}.log"
    if s.peer == "distillation" and method != "grpo-kd-cli":  # the final students, for the held-out evaluation
        s = dataclasses.replace(s, keep_student=str(_peer().student_dir(s, method, repeat)))
    result = measure_cli(s, log_path) if method == "grpo-kd-cli" else measure_worker(method, s, log_path)
    result.update(repeat=repeat, load1_before=before, load1_after=load1(),
                  time_s=statistics.median(result["iteration_s"]))
    print(f"  {method:12s} repeat {repeat}: {result['time_s']:.2f} s/iteration, "
          f"peak RSS {result['peak_rss'] / 2**20:.0f} MiB, load {before:.1f} -> {result['load1_after']:.1f}",
          flush=True)
    return result


# ----------------------------------------------------------------------------------------------- report


def summarise(runs: list[dict]) -> dict:
    """Medians over the repeats of one method."""
    mib = 2**20
    out = {"time_s": statistics.median(r["time_s"] for r in runs),
           "time_s_min": min(r["time_s"] for r in runs), "time_s_max": max(r["time_s"] for r in runs),
           "peak_rss_mib": statistics.median(r["peak_rss"] for r in runs) / mib,
           "completion_tokens": statistics.median(t for r in runs for t in r["completion_tokens"])}
    if "rss_after_imports" in runs[0]:
        out["rss_after_imports_mib"] = statistics.median(r["rss_after_imports"] for r in runs) / mib
        out["working_mib"] = statistics.median(r["peak_rss"] - r["rss_after_imports"] for r in runs) / mib
    if "phases_s" in runs[0]:
        names = runs[0]["phases_s"][0].keys()
        out["phases_s"] = {n: statistics.median(p[n] for r in runs for p in r["phases_s"]) for n in names}
    return out


def judge(summary: dict) -> dict:
    trl, one, cli = summary["trl"], summary["grpo-kd"], summary["grpo-kd-cli"]
    verdict = {"speedup_one_process": trl["time_s"] / one["time_s"], "speedup_cli": trl["time_s"] / cli["time_s"],
               "memory_ratio_one_process": one["peak_rss_mib"] / trl["peak_rss_mib"],
               "memory_ratio_cli": cli["peak_rss_mib"] / trl["peak_rss_mib"]}
    verdict["target_time_met"] = verdict["speedup_one_process"] >= 1.5
    verdict["target_memory_met"] = verdict["memory_ratio_one_process"] <= 0.5
    return verdict


def _fmt_time(m: dict) -> str:
    return f"{m['time_s']:.2f} ({m['time_s_min']:.2f}-{m['time_s_max']:.2f})"


def markdown(report: dict) -> str:
    s, summary, v = report["settings"], report["summary"], report["verdict"]
    distill = s.get("peer") == "distillation"
    labels = _peer().LABELS if distill else LABELS
    if distill:
        title, setup = "grpo-kd token reverse KL vs TRL DistillationTrainer", _peer().settings_text(report)
    else:
        title = "grpo-kd vs TRL GRPOTrainer"
        setup = (f"{s['prompts']} prompts x G={s['group_size']}, {s['max_new_tokens']} new tokens, temperature "
                 f"{s['temperature']}, lr {s['lr']} constant, loss {s['loss_type']}, beta {s['beta']}, epsilon "
                 f"{s['epsilon']}, {s['micro_batch']} completions per optimizer step ({s['steps_per_iteration']} "
                 "steps per iteration), reward = mean teacher log-prob of the completion tokens; ")
    lines = [f"# {title} ({report['device']})", "", f"Command: `{report['command']}`", "",
             f"TRL {report['versions']['trl']}, transformers {report['versions']['transformers']}, torch "
             f"{report['versions']['torch']} ({report['torch_threads']} threads), {report['cpus']} CPUs. "
             f"CPU only, float32; GPU figures are not measured.", "", f"Models: {report['models']}.", "",
             f"{setup}grpo-kd teacher cache k={s['top_k']}. Each figure: median over {report['repeats']} fresh "
             f"processes of the median of {s['iterations']} "
             f"iterations after {s['warmup']} warm-up (CLI: {s['cli_iterations']} iterations, no warm-up: each "
             "phase is a fresh process); time range = min-max over the processes. RSS after imports = after "
             "importing the libraries the method uses (a library floor, approximate: some modules load lazily).", "",
             "| method | s / iteration (range) | vs TRL time | peak RSS MiB | vs TRL memory | RSS after imports MiB "
             "| peak - imports MiB | completion tokens / iteration |",
             "|---|---|---|---|---|---|---|---|"]
    for method in METHODS:
        m = summary[method]
        speed = "1.00x" if method == "trl" else f"{summary['trl']['time_s'] / m['time_s']:.2f}x TRL's speed"
        mem = "1.00" if method == "trl" else f"{m['peak_rss_mib'] / summary['trl']['peak_rss_mib']:.2f}"
        imports = f"{m['rss_after_imports_mib']:.0f}" if "rss_after_imports_mib" in m else "-"
        working = f"{m['working_mib']:.0f}" if "working_mib" in m else "-"
        lines.append(f"| {labels[method]} | {_fmt_time(m)} | {speed} | {m['peak_rss_mib']:.0f} | {mem} | {imports} "
                     f"| {working} | {m['completion_tokens']:.0f} |")
    for method in ("grpo-kd", "grpo-kd-cli"):
        phases = ", ".join(f"{k} {t:.2f} s" for k, t in summary[method]["phases_s"].items())
        lines.append(f"\n{labels[method]}, phases (median): {phases}.")
    load = report["load1"]
    lines += ["", f"Targets (grpo-kd in one process vs TRL): >= 1.5x faster: "
              f"{'met' if v['target_time_met'] else 'MISSED'} ({v['speedup_one_process']:.2f}x); <= 0.5x peak memory: "
              f"{'met' if v['target_memory_met'] else 'MISSED'} ({v['memory_ratio_one_process']:.2f}x). The CLI's peak "
              "is the largest of its three processes.", "",
              f"1-minute load average during the run: min {load['min']:.1f}, median {load['median']:.1f}, max "
              f"{load['max']:.1f} (the machine is shared with other work)."]
    if distill:
        lines += _peer().markdown_section(report)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- main


def write_prompts(path: Path, count: int) -> None:
    from grpo_kd.tiny import corpus_texts

    lines = [t.split() for t in corpus_texts() if len(t.split()) > PROMPT_WORDS]
    if len(lines) < count:
        raise SystemExit(f"bench_trl: the built-in corpus has {len(lines)} usable lines, fewer than --prompts {count}")
    rows = [{"id": f"p{i}", "prompt": " ".join(words[:PROMPT_WORDS])} for i, words in enumerate(lines[:count])]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


FAROESE = ROOT.parent / "shared" / "data" / "faroese"
SCALES = ("tiny", "medium")


def build_models(work: Path, scale: str, seed: int, pretrain_steps: int = 0):
    """The teacher/student pair of `scale` in WORK/models (or WORK/models-<scale>[-pt<steps>]), built once and
    reused; `pretrain_steps` (medium only) pre-trains both, so that the teacher is peaked as real teachers are."""
    from grpo_kd.tiny import BUILTIN_CORPUS, TinyArch, build_tiny_models

    if scale == "tiny":
        return build_tiny_models(work / "models", seed=seed)
    corpus = sorted(FAROESE.glob("*.conllu")) + [BUILTIN_CORPUS]
    name = f"models-{scale}" + (f"-pt{pretrain_steps}" if pretrain_steps else "")
    return build_tiny_models(
        work / name, corpus, vocab_size=16384, pretrain_steps=pretrain_steps, student_pretrain_steps=pretrain_steps,
        seed=seed,
        teacher_arch=TinyArch(hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=2, intermediate_size=1024,
                              tie_embeddings=False),
        student_arch=TinyArch(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=704,
                              tie_embeddings=True),
    )


def model_summary(models_dir: Path) -> str:
    build = json.loads((models_dir / "build.json").read_text())
    parts = [f"{role} {build[role]['parameters']:,} parameters ({build[role]['arch']['num_layers']} layers x "
             f"{build[role]['arch']['hidden_size']}, {build[role]['pretrain_steps']} pre-training steps)"
             for role in ("teacher", "student")]
    return f"{'; '.join(parts)}; vocabulary {build['vocab_size']:,}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = Settings()
    ints = ("prompts", "group_size", "max_new_tokens", "micro_batch", "top_k", "iterations", "warmup",
            "cli_iterations", "seed")
    for name in ints:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("lr", "beta", "epsilon", "temperature"):
        p.add_argument("--" + name, type=float, default=getattr(defaults, name))
    p.add_argument("--loss-type", default=defaults.loss_type, choices=["grpo", "bnpo", "dr_grpo", "dapo"])
    p.add_argument("--peer", default=defaults.peer, choices=["grpo", "distillation"],
                   help="TRL's GRPOTrainer (default) or its DistillationTrainer vs grpo-kd's token reverse KL")
    p.add_argument("--heldout", type=int, default=64, help="distillation: held-out prompts of the reverse-KL check")
    p.add_argument("--scale", default=defaults.scale, choices=list(SCALES), help="model sizes (see the module doc)")
    p.add_argument("--pretrain-steps", type=int, default=0,
                   help="medium: pre-training steps of both models (default 0: random weights, a flat teacher)")
    p.add_argument("--threads", type=int, default=0, help="OMP/MKL threads of every measured process (0: default)")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per method (the median is reported)")
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-trl", help="models, runs and logs")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--worker", nargs=2, metavar=("METHOD", "SPEC"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(*args.worker)
        return 0
    if importlib.util.find_spec("trl") is None:
        print("bench_trl: TRL is not installed; install it with `pip install trl` (measured with trl==1.16.0)",
              file=sys.stderr)
        return 2
    if (args.prompts * args.group_size) % args.micro_batch or args.group_size < 2:
        print("bench_trl: --prompts x --group-size must be a multiple of --micro-batch, and --group-size >= 2",
              file=sys.stderr)
        return 2
    global THREADS
    THREADS = args.threads
    import torch
    import transformers
    import trl

    from grpo_kd.kernels.bench_report import device_slug

    work = args.workdir.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    models = build_models(work, args.scale, args.seed, args.pretrain_steps)
    write_prompts(work / "prompts.jsonl", args.prompts)
    fields = {f.name for f in dataclasses.fields(Settings)} - {"models", "prompts_file", "workdir", "keep_student"}
    s = Settings(**{k: getattr(args, k) for k in fields}, models=str(models.student.parent),
                 prompts_file=str(work / "prompts.jsonl"), workdir=str(work))
    shutil.rmtree(work / "students", ignore_errors=True)  # the distillation peer's final students, this run's only
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    for repeat in range(args.repeats):
        print(f"repeat {repeat + 1}/{args.repeats}", flush=True)
        for method in METHODS:
            runs[method].append(measure(method, s, work / "logs", repeat))
    heldout = None
    if args.peer == "distillation":  # after every measurement, so that it loads none of them
        print(f"held-out reverse KL on {args.heldout} prompts", flush=True)
        if THREADS:
            torch.set_num_threads(THREADS)
        prompts = _peer().heldout_prompts(work, args.prompts, args.heldout)
        heldout = _peer().evaluate_students(s, grpokd_config(s, work / "eval" / "run", 1), prompts, args.repeats)
    loads = [r[k] for rs in runs.values() for r in rs for k in ("load1_before", "load1_after")]
    summary = {m: summarise(rs) for m, rs in runs.items()}
    report = {
        "device": device_slug("cpu"), "cpus": os.cpu_count(),
        "torch_threads": args.threads or torch.get_num_threads(),
        "command": " ".join(["python benchmarks/bench_trl.py", *argv]), "repeats": args.repeats,
        "settings": {**dataclasses.asdict(s), "steps_per_iteration": s.steps_per_iteration},
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "load1": {"min": min(loads), "median": statistics.median(loads), "max": max(loads)},
        "models": model_summary(models.teacher.parent), "summary": summary, "runs": runs,
    }  # fmt: skip
    report["verdict"] = judge(summary)
    if heldout is not None:
        report["heldout"] = heldout
    out = args.out / report["device"]
    out.mkdir(parents=True, exist_ok=True)
    stem = "trl" if args.peer == "grpo" else "trl-distill"
    stem = stem if args.scale == "tiny" else f"{stem}-{args.scale}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.modules.setdefault("bench_trl", sys.modules["__main__"])  # trl_distill_peer imports this module by name
    sys.exit(main(sys.argv[1:]))
