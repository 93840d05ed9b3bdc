"""Conventions shared by every kernel: the logit transform, input checks, chunk sizing and the `impl` switch.

Every kernel in `grpo_kd.kernels` takes the student's final hidden states and its LM-head weight, never logits,
and turns them into log-probabilities in exactly one way, fixed here:

    x = hidden @ weight.T + bias                 # raw logits, bias optional              (N, V)
    s = softcap * tanh(x / softcap)              # Gemma-style soft cap, only if softcap is not None
    z = s / temperature                          # temperature last
    log q = z - logsumexp(z)                     # normalised over the full vocabulary V

so that  dz/dx = (1 - tanh(x / softcap)^2) / temperature  (just 1 / temperature without a soft cap).

Key design choice: nothing here, nor in any kernel, materialises an N x V tensor. The pure-PyTorch twin of
each kernel walks over row chunks of at most `rows_per_chunk(V, budget)` rows (so at most about `budget`
bytes of float32 logits live at once); the Triton path tiles over V with an online log-sum-exp. `resolve_impl`
picks between the two: Triton for CUDA tensors, the torch twin elsewhere, unless the caller insists.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

import torch

from grpo_kd.errors import GrpoKdError

IMPLS = ("auto", "triton", "torch")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEFAULT_CHUNK_BYTES = 64 * 2**20  # CPU: float32 logits of one row chunk (two such buffers live at once); larger
# chunks re-read the weight fewer times (benchmarks/results/<cpu>/kernels.md: peak within 1/8 of eager's)
CUDA_CHUNK_BYTES = 2**30  # CUDA: big enough for ~2k rows at V=128k, so each chunk's GEMMs stay efficient


# ----------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class LinearOptions:
    """The non-tensor options of the hidden -> logits map, shared by every autograd Function."""

    temperature: float = 1.0  # z = s / temperature
    softcap: float | None = None  # s = softcap * tanh(x / softcap); None = no cap
    impl: str = "torch"  # resolved: "triton" or "torch" (never "auto" here)
    chunk_bytes: int = DEFAULT_CHUNK_BYTES  # float32 logit bytes per row chunk (torch twin, backward buffer)


def make_options(temperature: float, softcap: float | None, impl: str, *tensors: torch.Tensor | None) -> LinearOptions:
    """Check `temperature`/`softcap`/`impl` and return the frozen options with `impl` resolved."""
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature <= 0:
        raise GrpoKdError(f"temperature must be a positive finite number, got {temperature!r}")
    if softcap is not None:
        softcap = float(softcap)
        if not math.isfinite(softcap) or softcap <= 0:
            raise GrpoKdError(f"softcap must be a positive finite number or None, got {softcap!r}")
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    return LinearOptions(
        temperature=temperature,
        softcap=softcap,
        impl=resolve_impl(impl, *tensors),
        chunk_bytes=CUDA_CHUNK_BYTES if on_cuda else DEFAULT_CHUNK_BYTES,  # read at call time: tests shrink it
    )


# ----------------------------------------------------------------------------------------------- the transform


def transform_logits(
    logits: torch.Tensor, temperature: float = 1.0, softcap: float | None = None, inplace: bool = False
) -> torch.Tensor:
    """Raw logits x -> transformed logits z = (softcap * tanh(x / softcap)) / temperature (same shape);
    `inplace=True` overwrites `logits` (the twins' row chunks: one pass fewer over a [rows, V] buffer)."""
    if softcap is not None:
        logits = logits.div_(softcap).tanh_().mul_(softcap) if inplace else softcap * torch.tanh(logits / softcap)
    if temperature != 1.0:
        logits = logits.div_(temperature) if inplace else logits / temperature
    return logits


def transform_grad(
    logits: torch.Tensor, temperature: float = 1.0, softcap: float | None = None
) -> torch.Tensor | float:
    """dz/dx at the raw logits x: (1 - tanh(x / softcap)^2) / temperature, or the scalar 1/temperature."""
    if softcap is None:
        return 1.0 / temperature
    th = torch.div(logits, softcap).tanh_()  # one new buffer, the rest in place
    th = th.square_().neg_().add_(1.0)
    return th.div_(temperature) if temperature != 1.0 else th


def mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b with an fp32 result; fp32 accumulation for half inputs (cuBLAS out_dtype, or upcast on the CPU,
    where there is no half matmul with an fp32 result). `out` (fp32, contiguous, the product's shape) receives
    the product (copied there for half inputs on CUDA): the twins' row chunks reuse one buffer."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b if out is None else torch.mm(a, b, out=out)
    if a.is_cuda:
        try:
            product = torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # older torch: accumulate in fp32, round once per chunk
            product = (a @ b).float()
        return product if out is None else out.copy_(product)
    return a.float() @ b.float() if out is None else torch.mm(a.float(), b.float(), out=out)


def xlogx(t: torch.Tensor) -> torch.Tensor:
    """t log t with 0 log 0 = 0 and a finite gradient everywhere."""
    pos = t > 0
    safe = torch.where(pos, t, torch.ones_like(t))
    return torch.where(pos, safe * torch.log(safe), torch.zeros_like(t))


# ----------------------------------------------------------------------------------------------- shapes & dtypes


def flatten_hidden(hidden: torch.Tensor, name: str = "hidden") -> tuple[torch.Tensor, tuple[int, ...]]:
    """`[N, H]` or `[B, T, H]` -> (contiguous `[rows, H]`, leading shape `(N,)` or `(B, T)`)."""
    if not isinstance(hidden, torch.Tensor):
        raise GrpoKdError(f"{name} must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dim() not in (2, 3):
        raise GrpoKdError(f"{name} must be [N, H] or [B, T, H], got shape {tuple(hidden.shape)}")
    lead = tuple(hidden.shape[:-1])
    return hidden.reshape(-1, hidden.shape[-1]).contiguous(), lead


def flatten_rows(t: torch.Tensor, lead: tuple[int, ...], name: str, trailing: int = 0) -> torch.Tensor:
    """Check that `t` has shape `lead + (trailing dims)` and flatten the leading dims to one row dim."""
    if not isinstance(t, torch.Tensor):
        raise GrpoKdError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(lead) + trailing or tuple(t.shape[: len(lead)]) != lead:
        want = list(lead) + ["k"] * trailing
        raise GrpoKdError(f"{name} must have shape {want} to match hidden, got {tuple(t.shape)}")
    rows = math.prod(lead)
    return t.reshape(rows, *t.shape[len(lead):]).contiguous()


def unflatten_rows(t: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
    """`[rows, ...]` -> `lead + [...]` (inverse of `flatten_rows`)."""
    return t.reshape(*lead, *t.shape[1:])


def check_linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Check the LM-head inputs: `hidden [rows, H]`, `weight [V, H]`, `bias [V]`, float dtypes, one device."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise GrpoKdError(f"weight must be a [V, H] tensor, got {getattr(weight, 'shape', type(weight).__name__)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise GrpoKdError(f"weight must be [V, H] with H={hidden.shape[-1]} as in hidden, got {tuple(weight.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise GrpoKdError(f"bias must be [V]={weight.shape[0]}, got {getattr(bias, 'shape', type(bias).__name__)}")
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype not in SUPPORTED_DTYPES:
            raise GrpoKdError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
        if t.device != hidden.device:
            raise GrpoKdError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if weight.dtype != hidden.dtype:
        raise GrpoKdError(f"weight has dtype {weight.dtype} but hidden has {hidden.dtype}; they must match")


def prepare_linear(hidden, weight, bias):
    """Check and flatten: -> (hidden (rows, H) contiguous, leading shape, weight contiguous, bias contiguous)."""
    hidden2, lead = flatten_hidden(hidden)
    check_linear(hidden2, weight, bias)
    return hidden2, lead, weight.contiguous(), None if bias is None else bias.contiguous()


def check_ids(ids: torch.Tensor, vocab: int, name: str, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Ids must be integers in [0, V) where `valid` (broadcastable bool) is True; returns int64 ids with the
    entries outside `valid` replaced by 0, so that they can be gathered safely."""
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise GrpoKdError(f"{name} must be an integer tensor, got {ids.dtype}")
    ids = ids.long()
    if valid is not None:
        ids = torch.where(valid, ids, torch.zeros_like(ids))
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise GrpoKdError(f"{name} holds id {bad}, outside the vocabulary [0, {vocab})")
    return ids


def rows_per_chunk(V: int, bytes_budget: int = DEFAULT_CHUNK_BYTES, bytes_per_elem: int = 4) -> int:
    """Rows of a `[rows, V]` float32 scratch that fit in `bytes_budget` (at least 1)."""
    return max(1, int(bytes_budget) // max(1, V * bytes_per_elem))


def chunk_buffers(n_rows: int, V: int, count: int, device, bytes_budget: int = DEFAULT_CHUNK_BYTES) -> list:
    """`count` float32 `[rows, V]` scratch buffers for a loop over `row_chunks(n_rows, V, bytes_budget)`,
    allocated once per call; chunk i uses `buf[:rows_i]`. Key design choice: on the CPU a fresh 64 MiB buffer
    per chunk is a fresh mmap, and writing it first page-faults every 4 KiB page (an `exp` into a fresh buffer
    took 100 ms against 27 ms into a reused one), so the twins reuse theirs; the peak is the same."""
    step = min(max(n_rows, 1), rows_per_chunk(V, bytes_budget))
    return [torch.empty(step, V, dtype=torch.float32, device=device) for _ in range(count)]


def row_chunks(n_rows: int, V: int, bytes_budget: int = DEFAULT_CHUNK_BYTES) -> Sequence[slice]:
    """Slices that cover `range(n_rows)` in chunks of `rows_per_chunk(V, bytes_budget)` rows."""
    step = rows_per_chunk(V, bytes_budget)
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


# ----------------------------------------------------------------------------------------------- impl dispatch


def triton_available() -> bool:
    """True when `import triton` works (it may still need CUDA or TRITON_INTERPRET=1 to run)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the environment
        return False
    return True


def interpreter_on() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_impl(impl: str, *tensors: torch.Tensor | None) -> str:
    """`"auto"` -> `"triton"` when the tensors are on CUDA and Triton imports, else `"torch"`.

    `"triton"` is honoured on CUDA tensors, and on CPU tensors only under TRITON_INTERPRET=1; otherwise, and
    when Triton does not import, it raises `GrpoKdError`.
    """
    if impl not in IMPLS:
        raise GrpoKdError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    if impl == "torch":
        return "torch"
    if impl == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if not triton_available():
        raise GrpoKdError("impl='triton' was asked for but triton is not importable; use impl='torch' or 'auto'")
    if not on_cuda and not interpreter_on():
        raise GrpoKdError("impl='triton' on CPU tensors needs TRITON_INTERPRET=1; use impl='torch' or 'auto'")
    return "triton"


def reduction_check(reduction: str) -> str:
    if reduction not in ("mean", "sum", "none"):
        raise GrpoKdError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return reduction
