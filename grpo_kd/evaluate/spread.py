"""The spread of a number over seeds: a mean with a 95% Student-t interval (n >= 2), or the min-max range.

    s = spread([0.41, 0.38, 0.45])               # Spread(mean=0.413, low=0.326, high=0.500, n=3, method="t95")
    s = spread([0.41, 0.38, 0.45], "minmax")     # low=0.38, high=0.45
    overlap(a, b)                                # False: the difference is larger than the seed spread

Key design choice: the t quantile is computed here (bisection on the t distribution's CDF, integrated with
Simpson's rule) rather than taken from scipy, which the package does not otherwise need; tests check it against
the published table. With one seed there is no spread: the interval is the value itself and `n == 1` says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal, Sequence

Method = Literal["t95", "minmax"]
METHODS: tuple[str, ...] = ("t95", "minmax")
METHOD_TEXT = {
    "t95": "mean with a 95% Student-t interval over seeds (mean ± t(0.975, n-1) · sd / √n)",
    "minmax": "mean with the min-max range over seeds",
}


def _t_density(t: float, df: int) -> float:
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))


def t_cdf(t: float, df: int, intervals: int = 2000) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom (Simpson's rule from 0 to |t|)."""
    a = abs(t)
    h = a / intervals
    total = _t_density(0.0, df) + _t_density(a, df)
    total += sum((4 if i % 2 else 2) * _t_density(i * h, df) for i in range(1, intervals))
    half = total * h / 3
    return 0.5 + half if t >= 0 else 0.5 - half


@lru_cache(maxsize=None)
def t_quantile(p: float, df: int) -> float:
    """The `p` quantile (p > 0.5) of Student's t with `df` degrees of freedom, by bisection to 1e-9."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2
    while high - low > 1e-9:
        middle = (low + high) / 2
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2


@dataclass(frozen=True)
class Spread:
    mean: float
    low: float
    high: float
    n: int
    method: str
    values: tuple[float, ...] = field(default=(), repr=False)

    def to_json(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n, "values": list(self.values)}


def spread(values: Sequence[float], method: Method = "t95") -> Spread:
    """The mean of `values` and its interval by `method` (one value: the value itself, no interval)."""
    if method not in METHODS:
        raise ValueError(f"unknown interval method {method!r}; expected one of {', '.join(METHODS)}")
    xs = tuple(float(v) for v in values)
    if not xs:
        raise ValueError("spread of no values")
    n = len(xs)
    mean = sum(xs) / n
    if n == 1:
        return Spread(mean, mean, mean, 1, method, xs)
    if method == "minmax":
        return Spread(mean, min(xs), max(xs), n, method, xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
    return Spread(mean, mean - half, mean + half, n, method, xs)


def overlap(a: Spread, b: Spread) -> bool | None:
    """Whether two intervals overlap; None when either has one value (no spread to compare with)."""
    if a.n < 2 or b.n < 2:
        return None
    return a.low <= b.high and b.low <= a.high
