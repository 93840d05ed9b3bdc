"""Sanity of the numbers a shard holds, checked where they enter and where they leave the cache.

    why = logprob_problem("target_logprobs", values)      # None, or "target_logprobs holds nan at token 3"
    sums = row_sums(values, counts)                        # per-row float64 sums of a flat per-token array

Key design choice: one definition of "a sane log-prob" — finite and at most `LOGPROB_TOL` above zero (the
half-precision rounding of log-probs near 0) — used by the writers (a teacher or a student that produces NaN is
stopped before anything is written), by the readers (a shard changed after it was written is refused before a
step trains on it) and by `grpo-kd cache verify`. A corrupted float such as 1e30 is as much a problem as a NaN:
it is not a log-prob.
"""

from __future__ import annotations

import numpy as np

LOGPROB_TOL = 1e-3  # a stored log-prob may exceed 0 by this much (half-precision rounding near 0)


def first_bad(values: np.ndarray, *, logprobs: bool) -> tuple[int, float] | None:
    """(index along the first axis, value) of the first value that is not finite (or, with `logprobs`, that is
    above `LOGPROB_TOL`); None when there is none."""
    values = np.asarray(values)
    if values.size == 0 or values.dtype.kind not in "fc":
        return None
    flat = values.reshape(len(values), -1)
    bad = ~np.isfinite(flat)
    if logprobs:
        bad |= flat > LOGPROB_TOL
    if not bad.any():
        return None
    row, col = np.argwhere(bad)[0]
    return int(row), float(flat[row, col])


def describe_bad(name: str, value: float, where: str) -> str:
    """`target_logprobs holds nan at token 3 (not a finite number)`."""
    what = "not a finite number" if not np.isfinite(value) else "above 0, so not a log-prob"
    return f"{name} holds {value:g} at {where} ({what})"


def logprob_problem(name: str, values: np.ndarray, *, where: str = "token") -> str | None:
    """None when every value is a plausible log-prob, else one phrase naming `name`, the value and its index."""
    found = first_bad(values, logprobs=True)
    return None if found is None else describe_bad(name, found[1], f"{where} {found[0]}")


def row_sums(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per-row sums (float64) of a flat per-token array: row i owns the next `counts[i]` values.

    Rows with no values sum to 0. `np.add.reduceat` is given the starts of the non-empty rows only: an empty row
    has no segment of its own, and the start of an empty last row would be out of range (an IndexError)."""
    counts = np.asarray(counts, dtype=np.int64)
    sums = np.zeros(len(counts), np.float64)
    nonempty = counts > 0
    if nonempty.any():
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[nonempty]
        sums[nonempty] = np.add.reduceat(np.asarray(values, dtype=np.float64), starts)
    return sums
