"""Exact match and token F1 for extractive QA, with SQuAD semantics and a normalisation that suits Faroese.

Key design choice: the normalisation is the SQuAD one made Unicode-aware and language-aware, so that a score
here means what a SQuAD score means, while Faroese answers are not damaged by it:

1. NFC-normalise, so that "a" + COMBINING ACUTE and the precomposed "á" are the same letter;
2. fold case with `str.casefold` ("Ð" -> "ð", "Ø" -> "ø", "Æ" -> "æ"); letters are never stripped of accents,
   so ð, ø, á, í, ó, ú, ý, æ survive (SQuAD's ASCII-only `string.punctuation` never touched them either);
3. delete every character of Unicode category P* (punctuation) or S* (symbols): SQuAD deletes (not replaces)
   its ASCII punctuation, so "Norður-Amerika" -> "norðuramerika" both in the prediction and the gold answer.
   Typographic quotes (“ ” „ « »), dashes (– —) and the like are removed too, which ASCII SQuAD missed;
4. remove free-standing articles only for languages that have them as separate words in the SQuAD sense:
   English "a/an/the". Faroese has no indefinite article and marks definiteness with a suffix ("bókin",
   "the book"); its free-standing "hin/tann" are also demonstratives and pronouns ("tann" = "that one"),
   so deleting them would change answers. For `language="fo"` (the default) no words are removed;
5. split on Unicode whitespace and re-join with single spaces.

Scores (both in [0, 1]) are the maximum over the gold answers, as in SQuAD:

- exact match: 1 if the normalised prediction equals a normalised gold answer, else 0;
- token F1: with `common` = the multiset intersection of the prediction's and the gold answer's tokens,
  precision = |common| / |prediction|, recall = |common| / |gold|, F1 = 2 P R / (P + R) (0 when nothing is
  shared). An empty prediction against a non-empty gold answer scores 0.

Empty gold answers (decision): an example with no gold answers, or whose answers all normalise to nothing, is
*unanswerable* in the SQuAD v2 sense: the correct prediction is the empty string, which scores EM = F1 = 1;
any non-empty prediction scores 0. FoQA has no unanswerable questions, so this only matters for other data.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from typing import Iterable, Sequence

# Free-standing articles removed per language (ISO 639-1). Languages not listed remove none.
ARTICLES: dict[str, frozenset[str]] = {
    "en": frozenset({"a", "an", "the"}),
    "fo": frozenset(),  # definiteness is a suffix; "hin"/"tann" are also demonstratives: keep them
}


def _is_punctuation_or_symbol(char: str) -> bool:
    return unicodedata.category(char)[0] in "PS"


def normalize_answer(text: str, language: str = "fo") -> str:
    """NFC, case-fold, delete punctuation and symbols, drop `language`'s articles, collapse whitespace."""
    text = unicodedata.normalize("NFC", text).casefold()
    text = "".join(char for char in text if not _is_punctuation_or_symbol(char))
    articles = ARTICLES.get(language, frozenset())
    return " ".join(token for token in text.split() if token not in articles)


def exact_match(prediction: str, gold: str, language: str = "fo") -> float:
    return float(normalize_answer(prediction, language) == normalize_answer(gold, language))


def token_f1(prediction: str, gold: str, language: str = "fo") -> float:
    """Token F1 of one prediction against one gold answer (both normalised); 1 if both are empty."""
    predicted_tokens = normalize_answer(prediction, language).split()
    gold_tokens = normalize_answer(gold, language).split()
    if not predicted_tokens or not gold_tokens:
        return float(predicted_tokens == gold_tokens)
    common = sum((Counter(predicted_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(predicted_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_scores(prediction: str, answers: Sequence[str], language: str = "fo") -> dict[str, float]:
    """`{"em": ..., "f1": ...}` of `prediction` against the best of `answers` (SQuAD: max over gold answers).

    No gold answers (or only ones that normalise to nothing) means "unanswerable": the empty prediction is right.
    """
    golds = [answer for answer in answers if normalize_answer(answer, language)] or [""]
    return {
        "em": max(exact_match(prediction, gold, language) for gold in golds),
        "f1": max(token_f1(prediction, gold, language) for gold in golds),
    }


def mean_qa_scores(predictions: Iterable[str], answers: Iterable[Sequence[str]], language: str = "fo") -> dict:
    """Mean EM and F1 over a data set, with the number of examples."""
    scores = [qa_scores(p, a, language) for p, a in zip(predictions, answers, strict=True)]
    count = len(scores)
    return {
        "em": sum(s["em"] for s in scores) / count if count else 0.0,
        "f1": sum(s["f1"] for s in scores) / count if count else 0.0,
        "count": count,
    }
