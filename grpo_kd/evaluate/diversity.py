"""Diversity of generated text: distinct-n, repetition rate, mean length, and a mode-collapse warning.

RL fine-tuning can collapse a policy onto a few high-reward strings; these numbers catch it early. All of them
work on words: NFC-normalised, case-folded, whitespace-separated tokens of each text, so that students with
different tokenizers compare fairly.

- distinct-n (Li et al., 2016), corpus level: |unique n-grams over all texts| / |n-grams over all texts|.
  1.0 means no n-gram ever repeats; a collapsed model that says the same thing every time tends to 1/#texts.
- repetition rate (within a text, "seq-rep-n" of Welleck et al., 2019): for each text with at least one
  n-gram, 1 - |unique n-grams| / |n-grams|, i.e. the fraction of its n-grams that repeat an earlier one of the
  *same* text; averaged over those texts. Default n = 4. "og so og so og so" has 4-grams
  (og so og so), (so og so og), (og so og so): 3 n-grams, 2 unique, rate 1/3. This catches the degenerate
  loop ("og og og og ...") that distinct-n over a large corpus can miss.
- mean length: mean number of words per text (and of model tokens, where the caller knows them).

Collapse warning: a report is flagged when any of distinct-1/2/3 falls below `collapse_ratio` (default 0.5,
`eval.collapse_ratio`) times the same metric of a baseline (the initial model's diversity), or when the
repetition rate rises above the baseline's by more than `collapse_repetition_margin` (default 0.25).
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from typing import Sequence

DISTINCT_ORDERS = (1, 2, 3)


def words(text: str) -> list[str]:
    return unicodedata.normalize("NFC", text).casefold().split()


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams over all n-grams, pooled over `texts`; 0.0 when there is no n-gram at all."""
    pooled: Counter[tuple[str, ...]] = Counter()
    for text in texts:
        pooled.update(ngrams(words(text), n))
    total = sum(pooled.values())
    return len(pooled) / total if total else 0.0


def repetition_rate(texts: Sequence[str], n: int = 4) -> float:
    """Mean over texts (with >= 1 n-gram) of the fraction of a text's n-grams that repeat an earlier one."""
    rates = []
    for text in texts:
        grams = ngrams(words(text), n)
        if grams:
            rates.append(1.0 - len(set(grams)) / len(grams))
    return sum(rates) / len(rates) if rates else 0.0


def diversity_metrics(
    texts: Sequence[str], token_counts: Sequence[int] | None = None, repetition_n: int = 4
) -> dict[str, float]:
    """distinct-1/2/3, repetition rate, mean length in words (and in tokens when `token_counts` is given)."""
    metrics: dict[str, float] = {f"distinct_{n}": distinct_n(texts, n) for n in DISTINCT_ORDERS}
    metrics["repetition_rate"] = repetition_rate(texts, repetition_n)
    metrics["repetition_n"] = repetition_n
    metrics["mean_length_words"] = sum(len(words(t)) for t in texts) / len(texts) if texts else 0.0
    if token_counts is not None:
        metrics["mean_length_tokens"] = sum(token_counts) / len(token_counts) if token_counts else 0.0
    metrics["num_texts"] = len(texts)
    return metrics


def collapse_warnings(
    current: dict, baseline: dict, ratio: float = 0.5, repetition_margin: float = 0.25
) -> list[str]:
    """One line per sign of collapse of `current` against `baseline` (both from `diversity_metrics`)."""
    warnings = []
    for n in DISTINCT_ORDERS:
        key = f"distinct_{n}"
        now, before = current.get(key), baseline.get(key)
        if now is not None and before and now < ratio * before:
            warnings.append(f"{key} fell to {now:.3f}, below {ratio:g} x the baseline's {before:.3f}")
    now, before = current.get("repetition_rate"), baseline.get("repetition_rate")
    if now is not None and before is not None and now > before + repetition_margin:
        warnings.append(f"repetition_rate rose to {now:.3f} from the baseline's {before:.3f}")
    return warnings
