"""Kernel benchmarks: grpo-kd's fused kernels against the alternatives, side by side in one run.

Used by `benchmarks/bench_kernels.py` and `grpo-kd bench kernels`; never by tests (no timed tests).

Key design choice: **every measurement runs in a fresh subprocess** (`python -m grpo_kd.kernels.bench --worker`),
so that one method's allocator caches, lazily loaded kernels or compiled graphs cannot inflate or hide another's
peak. On the CPU the peak is the process's resident-set high-water mark (`getrusage(RUSAGE_SELF).ru_maxrss`)
after the run minus the resident set just after the inputs were allocated: what the forward and backward pass
added, weight and hidden-state gradients included. On a GPU it is `torch.cuda.max_memory_allocated()` minus
the memory held by the inputs, minus the bytes of the hidden and weight gradients. Times are medians of a few
repetitions after a warm-up (CUDA events on a GPU, `time.perf_counter` on the CPU).

Inputs are synthetic and seeded: hidden ~ N(0, 1), weight ~ N(0, 0.02^2), so the logits are O(1) and the GRPO
ratios straddle the clip range; teacher top-k ids are distinct per row; no `N x V` temporary is made before the
baseline is taken.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from grpo_kd.kernels.bench_report import device_slug, judge, markdown, write_report

RESULT_MARK = "BENCH_RESULT "
TEACHER_K = 64  # teacher top-k of the sparse-KL benchmark
TOPK_K = 128  # k of the linear_topk benchmark (the largest the teacher pass is designed for)
CPU_SIZES = {"full": dict(N=8192, H=512, V=32768), "quick": dict(N=1024, H=128, V=4096)}
GPU_SIZES = {"full": dict(N=8192, H=4096, V=128256), "quick": dict(N=2048, H=1024, V=32768)}
GPU_TOPK_SIZES = {"full": dict(N=8192, H=4096, V=262144), "quick": dict(N=2048, H=1024, V=65536)}
SEQ_LEN = 512  # GRPO rows are [B, T] with T = SEQ_LEN (or N when N is smaller)
MEMORY_NOTE = (
    "each method runs in a fresh subprocess. CPU: peak = ru_maxrss (resident-set high-water mark) after one "
    "forward+backward minus the resident set just after the inputs were allocated (so it includes the hidden "
    "and weight gradients and the allocator's slack). GPU: torch.cuda.max_memory_allocated() minus the memory "
    "held before the run (inputs) minus the bytes of the hidden and weight gradients."
)


@dataclass(frozen=True)
class Case:
    """One measurement: a kernel, a method, sizes, dtype, device."""

    kernel: str  # "logprobs" | "sparse_kl" | "grpo_loss" | "topk" | "floor"
    method: str  # "grpo-kd" | "eager" | "compile" | "liger" | "cce" | "matmuls"
    N: int
    H: int
    V: int
    dtype: str  # "float32" | "bfloat16"
    device: str  # "cpu" | "cuda"
    reps: int = 3


# ----------------------------------------------------------------------------------------------- inputs


def _inputs(case: Case) -> dict:
    """Seeded synthetic inputs on the device; the loss methods get hidden/weight with requires_grad."""
    gen = torch.Generator(device=case.device).manual_seed(0)
    dt, dev = getattr(torch, case.dtype), case.device
    N, H, V = case.N, case.H, case.V
    T = min(SEQ_LEN, N)
    B = N // T
    hidden = torch.randn(N, H, generator=gen, device=dev, dtype=dt)
    weight = torch.randn(V, H, generator=gen, device=dev, dtype=dt).mul_(0.02)
    grad = case.kernel in ("logprobs", "sparse_kl", "grpo_loss")
    inputs = {"hidden": hidden.requires_grad_(grad), "weight": weight.requires_grad_(grad)}
    if case.kernel == "logprobs":
        inputs["token_ids"] = torch.randint(0, V, (N,), generator=gen, device=dev)
    elif case.kernel == "sparse_kl":
        base = torch.randint(0, V, (N, 1), generator=gen, device=dev)
        step = V // TEACHER_K  # distinct ids: base + j * step (mod V), j < k
        inputs["teacher_ids"] = (base + torch.arange(TEACHER_K, device=dev) * step) % V  # (N, k)
        raw = torch.randn(N, TEACHER_K, generator=gen, device=dev)
        inputs["teacher_logprobs"] = torch.log_softmax(raw, dim=1) + math.log(0.9)  # 10% rest mass
    elif case.kernel == "grpo_loss":
        inputs["hidden"] = inputs["hidden"].detach().view(B, T, H).requires_grad_()
        inputs["token_ids"] = torch.randint(0, V, (B, T), generator=gen, device=dev)
        lengths = torch.randint(T // 2, T + 1, (B, 1), generator=gen, device=dev)
        inputs["mask"] = (torch.arange(T, device=dev) < lengths).float()  # (B, T)
        inputs["advantages"] = torch.randn(B, generator=gen, device=dev)
        centre = -math.log(V) - 0.1  # about the log-prob of a token under these logits
        inputs["old_logprobs"] = centre + 0.3 * torch.randn(B, T, generator=gen, device=dev)
        inputs["ref_logprobs"] = centre + 0.3 * torch.randn(B, T, generator=gen, device=dev)
    elif case.kernel == "topk":
        inputs["target_ids"] = torch.randint(0, V, (N,), generator=gen, device=dev)
    return inputs


# ----------------------------------------------------------------------------------------------- eager references


def eager_sparse_kl(hidden, weight, teacher_ids, teacher_logprobs, beta=None):
    """Materialised reverse KL with the rest bucket (linear_sparse_kl's default); JSD(beta) when beta is given."""
    logq = torch.log_softmax((hidden @ weight.T).float(), dim=-1)  # (N, V): the tensor grpo-kd never makes
    logq_s = logq.gather(1, teacher_ids)  # (N, k)
    rest_q = (-torch.expm1(torch.logsumexp(logq_s, 1, keepdim=True))).clamp_min(1e-8)
    rest_p = (-torch.expm1(torch.logsumexp(teacher_logprobs, 1, keepdim=True))).clamp_min(1e-8)
    log_b = torch.cat([logq_s, rest_q.log()], 1)  # student, k+1 categories
    log_a = torch.cat([teacher_logprobs, rest_p.log()], 1)  # teacher
    if beta is None:
        return (log_b.exp() * (log_b - log_a)).sum(1).mean()
    log_m = torch.logaddexp(log_a + math.log(beta), log_b + math.log(1 - beta))
    jsd = beta * (log_a.exp() * (log_a - log_m)).sum(1) + (1 - beta) * (log_b.exp() * (log_b - log_m)).sum(1)
    return jsd.mean()


def eager_grpo_loss(hidden, weight, token_ids, mask, advantages, old_logprobs, ref_logprobs, beta=0.04, eps=0.2):
    """Materialised DAPO GRPO loss with the k3 penalty, as TRL's GRPOTrainer writes it."""
    logits = (hidden @ weight.T).float()  # (B, T, V)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)  # (B, T)
    ratio = torch.exp(logp - old_logprobs)
    adv = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
    per_token = per_token + beta * (torch.exp(ref_logprobs - logp) - (ref_logprobs - logp) - 1)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


@torch.no_grad()
def eager_topk(hidden, weight, k, target_ids):
    """Full logits, logsumexp and torch.topk: the obvious way to fill the teacher cache."""
    z = (hidden.float() @ weight.float().T) if hidden.device.type == "cpu" else (hidden @ weight.T).float()
    lse = torch.logsumexp(z, dim=-1)
    values, ids = torch.topk(z, k, dim=-1)
    return ids, values - lse[:, None], lse, z.gather(1, target_ids[:, None])[:, 0] - lse


# ----------------------------------------------------------------------------------------------- methods


def _method_fn(case: Case):
    """The callable that runs one forward (+ backward for losses) of `case.method` and returns the loss."""
    from grpo_kd.kernels import linear_grpo_loss, linear_sparse_kl, linear_topk

    impl = "triton" if case.device == "cuda" else "torch"
    if case.kernel == "logprobs":  # mean token NLL (cross entropy): what CCE and Liger's fused CE compute
        return _nll_fn(case.method, impl)
    if case.kernel == "topk":
        if case.method == "grpo-kd":
            return lambda x: linear_topk(x["hidden"], x["weight"], TOPK_K, target_ids=x["target_ids"], impl=impl)[2]
        if case.method == "torch-twin":
            return lambda x: linear_topk(x["hidden"], x["weight"], TOPK_K, target_ids=x["target_ids"], impl="torch")[2]
        return lambda x: eager_topk(x["hidden"], x["weight"], TOPK_K, x["target_ids"])[2]
    jsd = case.device == "cuda"  # on a GPU the KL benchmark is the JSD, to compare with Liger's JSD loss
    if case.kernel == "sparse_kl":
        if case.method == "liger":
            return _liger_jsd()
        if case.method == "grpo-kd":
            kw = dict(divergence="jsd", beta=0.5) if jsd else {}
            return lambda x: linear_sparse_kl(x["hidden"], x["weight"], x["teacher_ids"], x["teacher_logprobs"],
                                              impl=impl, **kw)
        fn = lambda h, w, i, lp: eager_sparse_kl(h, w, i, lp, beta=0.5 if jsd else None)  # noqa: E731
        fn = torch.compile(fn) if case.method == "compile" else fn
        return lambda x: fn(x["hidden"], x["weight"], x["teacher_ids"], x["teacher_logprobs"])
    keys = ("token_ids", "mask", "advantages", "old_logprobs", "ref_logprobs")
    if case.method == "liger":
        return _liger_grpo()
    if case.method == "grpo-kd":
        return lambda x: linear_grpo_loss(x["hidden"], x["weight"], x["token_ids"], x["mask"], x["advantages"],
                                          old_logprobs=x["old_logprobs"], ref_logprobs=x["ref_logprobs"],
                                          beta=0.04, impl=impl)[0]
    fn = torch.compile(eager_grpo_loss) if case.method == "compile" else eager_grpo_loss
    return lambda x: fn(x["hidden"], x["weight"], *(x[k] for k in keys))


def _nll_fn(method: str, impl: str):
    from grpo_kd.kernels import linear_logprobs

    if method == "grpo-kd":
        return lambda x: -linear_logprobs(x["hidden"], x["weight"], x["token_ids"], impl=impl)[0].mean()
    if method == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return lambda x: linear_cross_entropy(x["hidden"], x["weight"], x["token_ids"])
    if method == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss_fn = LigerFusedLinearCrossEntropyLoss()
        return lambda x: loss_fn(x["weight"], x["hidden"], x["token_ids"])
    fn = lambda h, w, y: torch.nn.functional.cross_entropy((h @ w.T).float(), y)  # noqa: E731
    fn = torch.compile(fn) if method == "compile" else fn
    return lambda x: fn(x["hidden"], x["weight"], x["token_ids"])


def _liger_grpo():
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss_fn = LigerFusedLinearGRPOLoss(beta=0.04, loss_type="dapo", use_ref_model=True)
    return lambda x: loss_fn(x["hidden"], x["weight"], x["token_ids"], x["mask"], x["advantages"],
                             ref_per_token_logps=x["ref_logprobs"], old_per_token_logps=x["old_logprobs"])[0]


def _liger_jsd():
    """Liger's JSD needs the teacher's hidden states and head (a dense teacher): one more N x H x V matmul."""
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5)

    def run(x):
        if "teacher_hidden" not in x:  # made on first use, before the memory baseline (see _measure)
            x["teacher_hidden"] = torch.randn_like(x["hidden"]).detach()
            x["teacher_weight"] = torch.randn_like(x["weight"]).mul_(0.02).detach()
            x["labels"] = torch.zeros(x["hidden"].shape[0], dtype=torch.long, device=x["hidden"].device)
        return loss_fn(x["hidden"], x["weight"], x["teacher_hidden"], x["teacher_weight"], x["labels"], None, None)

    return run


def _floor_fn():
    """The three plain matmuls of an LM-head forward+backward, 2NHV flops each: logits, dhidden, dweight."""

    def run(x):
        h, w = x["hidden"].detach(), x["weight"].detach()
        if "dlogits" not in x:
            x["dlogits"] = torch.empty(h.shape[0], w.shape[0], device=h.device, dtype=h.dtype).normal_()
        logits = h @ w.T  # (N, V)
        dh = x["dlogits"] @ w  # (N, H)
        dw = x["dlogits"].T @ h  # (V, H)
        return logits[0, 0] + dh[0, 0] + dw[0, 0]

    return run


# ----------------------------------------------------------------------------------------------- one measurement


def _rss_now() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the high-water mark
        return _rss_peak()


def _rss_peak() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def _step(fn, x, backward: bool) -> float:
    out = fn(x)
    if backward:
        out.backward()
    value = float(out.detach().float().sum())
    for t in (x["hidden"], x["weight"]):
        t.grad = None
    return value


def _measure(case: Case) -> dict:
    """Runs inside the worker subprocess: memory of the first run, then the median time of `case.reps` runs."""
    torch.manual_seed(0)
    fn = _floor_fn() if case.kernel == "floor" else _method_fn(case)
    backward = case.kernel in ("logprobs", "sparse_kl", "grpo_loss")
    tiny = dataclasses.replace(case, N=min(case.N, 64), H=min(case.H, 32), V=min(case.V, 512))
    _step(fn, _inputs(tiny), backward)  # load libraries and kernels before the baseline
    x = _inputs(case)
    cuda = case.device == "cuda"
    if cuda:
        _step(fn, x, backward)  # warm-up at full size: Triton autotune / torch.compile, lazy buffers
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_now()
    value = _step(fn, x, backward)
    if cuda:
        torch.cuda.synchronize()
        grads = sum(t.numel() * t.element_size() for t in (x["hidden"], x["weight"])) if backward else 0
        peak = torch.cuda.max_memory_allocated() - base - grads
    else:
        peak = _rss_peak() - base
    times = [_timed(fn, x, backward, cuda) for _ in range(case.reps)]
    return {"peak_bytes": peak, "time_ms": statistics.median(times), "times_ms": times, "value": value}


def _timed(fn, x, backward: bool, cuda: bool) -> float:
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _step(fn, x, backward)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    _step(fn, x, backward)
    return (time.perf_counter() - t0) * 1e3


def run_case(case: Case, timeout_s: int = 1800) -> dict:
    """Measure `case` in a fresh Python process; returns the case's fields plus its result or error."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "grpo_kd.kernels.bench", "--worker", json.dumps(dataclasses.asdict(case))]
    row = dataclasses.asdict(case)
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {**row, "status": "error", "note": f"timed out after {timeout_s} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return {**row, **json.loads(line[len(RESULT_MARK):])}
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {**row, "status": "error", "note": f"worker exited {proc.returncode}: {last[:200]}"}


def _worker(spec: str) -> None:
    case = Case(**json.loads(spec))
    try:
        result = {"status": "ok", **_measure(case)}
    except ImportError as exc:
        result = {"status": "skipped", "note": f"not installed: {exc.name or exc}"}
    except torch.cuda.OutOfMemoryError:
        result = {"status": "oom", "note": "out of GPU memory"}
    except Exception as exc:  # reported in the table rather than aborting the whole comparison
        result = {"status": "error", "note": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    print(RESULT_MARK + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------- suites


def cpu_cases(quick: bool) -> list[Case]:
    """CPU: float32, the torch twin against materialised eager PyTorch, memory and time."""
    size = CPU_SIZES["quick" if quick else "full"]
    return [
        Case(kernel, method, **size, dtype="float32", device="cpu", reps=3)
        for kernel in ("sparse_kl", "grpo_loss", "topk")
        for method in ("grpo-kd", "eager")
    ]


def gpu_cases(quick: bool) -> list[Case]:
    """GPU: bf16 forward+backward against eager, torch.compile, Liger and (token NLL) Cut Cross-Entropy, the
    matmul floor; top-k at V=262144."""
    size = GPU_SIZES["quick" if quick else "full"]
    topk_size = GPU_TOPK_SIZES["quick" if quick else "full"]
    cases = [Case("floor", "matmuls", **size, dtype="bfloat16", device="cuda", reps=10)]
    for method in ("grpo-kd", "eager", "compile", "liger", "cce"):
        cases.append(Case("logprobs", method, **size, dtype="bfloat16", device="cuda", reps=10))
    for kernel in ("grpo_loss", "sparse_kl"):
        for method in ("grpo-kd", "eager", "compile", "liger"):
            cases.append(Case(kernel, method, **size, dtype="bfloat16", device="cuda", reps=10))
    for method in ("grpo-kd", "torch-twin", "eager"):
        cases.append(Case("topk", method, **topk_size, dtype="bfloat16", device="cuda", reps=10))
    return cases


def run_suite(quick: bool, device: str, progress=None, rounds: int = 1) -> dict:
    """Run every case of `device` ("cpu" or "cuda"), each in its own process, `rounds` times; returns the report.

    Rounds run the whole list of cases again (every other round in reverse order), so that a method and its
    baseline are measured close together in time, again and again: on a shared machine the load drifts over
    minutes, and a ratio taken within one round is less exposed to that drift than one across the whole run
    (bench_report.judge takes the median of the per-round ratios)."""
    cases = gpu_cases(quick) if device == "cuda" else cpu_cases(quick)
    load_before = _load_average()
    results: dict[Case, list[dict]] = {case: [] for case in cases}
    for i in range(max(1, rounds)):
        for case in cases if i % 2 == 0 else cases[::-1]:
            if progress:
                progress(case)
            results[case].append(run_case(case))
    rows = [merge_rounds(found) for found in results.values()]
    judge(rows)
    if quick:  # the targets are set for the full sizes (at quick sizes a chunk can hold every row)
        for row in rows:
            if row.get("targets"):
                row["targets"] = "not judged at --quick sizes"
    return {
        "device": device_slug(device),
        "quick": quick,
        "rounds": max(1, rounds),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "memory_method": MEMORY_NOTE,
        "load_before": load_before,
        "load_after": _load_average(),
        "rows": rows,
    }


def merge_rounds(found: list[dict]) -> dict:
    """One row from a case's rounds: time = median of the rounds' medians (each round's in `round_times_ms`),
    peak = the largest round's; a failed round makes the row that failure."""
    failed = [r for r in found if r.get("status") != "ok"]
    if failed:
        return failed[0]
    row = dict(found[0])
    row["round_times_ms"] = [r["time_ms"] for r in found]
    row["times_ms"] = [t for r in found for t in r["times_ms"]]
    row["time_ms"] = statistics.median(row["round_times_ms"])
    row["peak_bytes"] = max(r["peak_bytes"] for r in found)
    return row


def _load_average() -> str:
    """The 1/5/15-minute load averages (the machine may be shared: times are only comparable within a run)."""
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        from grpo_kd.errors import GrpoKdError

        raise GrpoKdError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        from grpo_kd.errors import GrpoKdError

        raise GrpoKdError("device cuda was asked for but CUDA is not available on this machine")
    return device


def main(argv: list[str] | None = None, command: str | None = None) -> int:
    """`python -m grpo_kd.kernels.bench [--quick] [--device D] [--out DIR]`; `command` is what gets recorded."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, for development")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--out", type=Path, default=None, help="results root; files go to OUT/<device>/")
    parser.add_argument("--rounds", type=int, default=1, help="run every case this many times, interleaved")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return 0
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    report = run_suite(args.quick, resolve_device(args.device), progress=lambda c: print(f"running {c}", flush=True),
                       rounds=args.rounds)
    command = command or " ".join(["python -m grpo_kd.kernels.bench", *(argv if argv is not None else sys.argv[1:])])
    print(markdown(report, command))
    if args.out:
        for path in write_report(report, command, args.out):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
