"""The QA and diversity scorers against values worked out by hand."""

import pytest

from grpo_kd.evaluate import qa_scores
from grpo_kd.evaluate.diversity import collapse_warnings, distinct_n, diversity_metrics, repetition_rate
from grpo_kd.evaluate.qa import mean_qa_scores, normalize_answer


def test_exact_answer():
    assert qa_scores("Tórshavn", ["Tórshavn"]) == {"em": 1.0, "f1": 1.0}


def test_case_and_punctuation_fold_but_faroese_letters_stay():
    assert qa_scores("tÓRSHAVN!", ["Tórshavn."]) == {"em": 1.0, "f1": 1.0}
    assert normalize_answer("Í Føroyum, ÐÆÝ; Áí Óú!") == "í føroyum ðæý áí óú"
    # stripping the accent would be a different word, not a match
    assert qa_scores("Torshavn", ["Tórshavn"]) == {"em": 0.0, "f1": 0.0}
    assert qa_scores("Foroyar", ["Føroyar"]) == {"em": 0.0, "f1": 0.0}


def test_nfc_composed_and_decomposed_letters_match():
    assert qa_scores("To\u0301rshavn", ["T\u00f3rshavn"])["em"] == 1.0


def test_unicode_punctuation_is_deleted_as_in_squad():
    assert normalize_answer("„Tórshavn“ – «høvuðsstaður»") == "tórshavn høvuðsstaður"
    # SQuAD deletes punctuation rather than splitting on it
    assert qa_scores("Norður-Amerika", ["NorðurAmerika"])["em"] == 1.0


def test_max_over_several_gold_answers():
    # vs "Gøta": 0; vs "Norðragøta": 0 (another inflection); vs "í Norðragøtu í Eysturoy":
    # common {í, norðragøtu} = 2, P = 2/2, R = 2/4, F1 = 2 * 1 * 0.5 / 1.5 = 2/3
    scores = qa_scores("í Norðragøtu", ["Gøta", "Norðragøta", "í Norðragøtu í Eysturoy"])
    assert scores["em"] == 0.0
    assert scores["f1"] == pytest.approx(2 / 3)
    assert qa_scores("Norðragøta", ["Gøta", "Norðragøta"]) == {"em": 1.0, "f1": 1.0}


def test_partial_overlap_f1():
    # P = 2/3, R = 2/2 -> F1 = 0.8
    assert qa_scores("Jóannes Patursson bóndi", ["Jóannes Patursson"])["f1"] == pytest.approx(0.8)


def test_repeated_tokens_count_as_a_multiset():
    # pred [og, og, og], gold [og, tey]: common = 1, P = 1/3, R = 1/2, F1 = 0.4
    assert qa_scores("og og og", ["og tey"])["f1"] == pytest.approx(0.4)


def test_empty_prediction_scores_zero():
    assert qa_scores("", ["Tórshavn"]) == {"em": 0.0, "f1": 0.0}
    assert qa_scores(" ... ", ["Tórshavn"]) == {"em": 0.0, "f1": 0.0}


def test_empty_gold_means_unanswerable():
    assert qa_scores("", []) == {"em": 1.0, "f1": 1.0}
    assert qa_scores("?!", ["", "..."]) == {"em": 1.0, "f1": 1.0}
    assert qa_scores("Tórshavn", []) == {"em": 0.0, "f1": 0.0}
    # an empty gold string beside a real one does not make an empty prediction right
    assert qa_scores("", ["", "Tórshavn"]) == {"em": 0.0, "f1": 0.0}


def test_articles_only_where_the_language_has_them():
    assert qa_scores("The cat", ["a cat"], language="en") == {"em": 1.0, "f1": 1.0}
    # Faroese (default): "hin" is kept; P = 2/3, R = 1 -> F1 = 0.8
    scores = qa_scores("hin gamli maðurin", ["gamli maðurin"])
    assert scores["em"] == 0.0 and scores["f1"] == pytest.approx(0.8)
    assert normalize_answer("a bók") == "a bók"


def test_mean_scores():
    mean = mean_qa_scores(["Tórshavn", "", "Jóannes Patursson bóndi"], [["Tórshavn"], ["Klaksvík"], ["Jóannes Patursson"]])
    assert mean["count"] == 3
    assert mean["em"] == pytest.approx(1 / 3)
    assert mean["f1"] == pytest.approx((1 + 0 + 0.8) / 3)


def test_distinct_n_by_hand():
    texts = ["eg eri glaður", "Eg eri svangur"]
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)  # eg eri glaður eg eri svangur
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # (eg eri) twice
    assert distinct_n(texts, 3) == pytest.approx(1.0)
    assert distinct_n(["ja"], 2) == 0.0  # no bigram at all


def test_repetition_rate_by_hand():
    texts = ["og so og so og so", "hey"]
    # 4-grams of the first: (og so og so), (so og so og), (og so og so): 3, 2 unique -> 1/3; "hey" has none
    assert repetition_rate(texts, 4) == pytest.approx(1 / 3)
    # bigrams: og-so so-og og-so so-og og-so: 5, 2 unique -> 0.6
    assert repetition_rate(texts, 2) == pytest.approx(0.6)
    assert repetition_rate(["eg eri glaður"], 2) == 0.0


def test_diversity_metrics_and_collapse():
    metrics = diversity_metrics(["eg eri glaður", "eg eri svangur"], token_counts=[4, 6])
    assert metrics["mean_length_words"] == 3 and metrics["mean_length_tokens"] == 5
    assert metrics["num_texts"] == 2
    baseline = {"distinct_1": 0.6, "distinct_2": 0.8, "distinct_3": 0.9, "repetition_rate": 0.05}
    collapsed = {"distinct_1": 0.5, "distinct_2": 0.3, "distinct_3": 0.4, "repetition_rate": 0.5}
    warnings = collapse_warnings(collapsed, baseline, ratio=0.5)
    assert len(warnings) == 3
    assert warnings[0].startswith("distinct_2 fell to 0.300")
    assert "repetition_rate" in warnings[-1]
    assert collapse_warnings(baseline, baseline) == []
