"""Scoring functions against cases worked out by hand (RULER's and LongBench's metrics included)."""

import pytest

from kvmerger.evaluation.metrics import (
    best_over_answers,
    classification_score,
    code_sim_score,
    contains_answer,
    count_score,
    fuzz_ratio,
    keyword_recall,
    longest_common_subsequence,
    normalize_answer,
    qa_f1_score,
    qa_f1_zh_score,
    retrieval_score,
    retrieval_zh_score,
    rouge_l,
    rouge_zh_score,
    ruler_postprocess,
    string_match_all,
    string_match_part,
)

# -- RULER ---------------------------------------------------------------------------------------


def test_string_match_all_is_the_share_of_references_found_ignoring_case():
    prediction = "The special magic numbers are 1234567 and 7654321, and the UUID ABC-def."
    assert string_match_all(prediction, ["1234567", "7654321", "9999999"]) == pytest.approx(2 / 3)
    assert string_match_all(prediction, ["abc-DEF"]) == 1.0
    assert string_match_all("", ["1"]) == 0.0


def test_string_match_part_needs_only_one_reference():
    assert string_match_part("answer: Paris", ["London", "paris"]) == 1.0
    assert string_match_part("answer: Rome", ["London", "paris"]) == 0.0


def test_ruler_metrics_refuse_an_empty_reference_list():
    with pytest.raises(ValueError, match="reference"):
        string_match_all("x", [])


def test_ruler_postprocess_strips_and_turns_control_characters_into_newlines():
    assert ruler_postprocess("  a\tb\x00c \n") == "a\nb\nc"


# -- LongBench: question answering ----------------------------------------------------------------


def test_squad_normalisation_drops_case_punctuation_articles_and_extra_spaces():
    assert normalize_answer("  The  Eiffel-Tower, in an old Paris! ") == "eiffeltower in old paris"


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        ("Paris", "Paris", 1.0),
        ("The Eiffel Tower, Paris", "paris", 0.5),  # p = 1/3, r = 1 -> 2 * (1/3) / (4/3) = 0.5
        ("a cat!", "The cat", 1.0),  # articles and punctuation vanish
        ("paris paris", "paris", 2 / 3),  # multiset overlap 1: p = 1/2, r = 1
        ("new york city", "york new", 0.8),  # overlap 2: p = 2/3, r = 1 -> 0.8
        ("London", "Paris", 0.0),
        ("", "Paris", 0.0),
    ],
)
def test_qa_f1_score(prediction, gold, expected):
    assert qa_f1_score(prediction, gold) == pytest.approx(expected)


def test_qa_f1_zh_score_normalises_each_segmented_word():
    characters = list  # a stand-in for jieba: one word per character
    # "北京，中国" -> 北 京 (，dropped) 中 国 against 北 京: overlap 2, p = 2/4, r = 1 -> 2/3
    assert qa_f1_zh_score("北京，中国", "北京", segment=characters) == pytest.approx(2 / 3)
    assert qa_f1_zh_score("上海", "北京", segment=characters) == 0.0


# -- LongBench: ROUGE-L (pltrdy/rouge semantics) --------------------------------------------------


def test_rouge_l_on_one_sentence():
    # words as sets: reference {the, cat, sat, on, mat} (m = 5), prediction {the, cat, lay, on, mat}
    # (n = 5); the LCS "the cat on the mat" has 4 distinct words: R = P = 0.8, F = 0.8
    assert rouge_l("the cat lay on the mat", "the cat sat on the mat") == pytest.approx(0.8, abs=1e-7)


def test_rouge_l_unites_the_lcs_of_every_sentence_pair():
    # reference sentences "a b" | "c d", prediction "c d" | "a b x": the union of the pairwise LCS is
    # {a, b, c, d}; m = 4, n = 5 -> R = 1, P = 0.8, F = 1.6 / 1.8
    assert rouge_l("c d. a b x", "a b. c d") == pytest.approx(1.6 / 1.8, abs=1e-7)


def test_rouge_l_reconstructs_the_lcs_with_the_packages_tie_break():
    # "a b" against "b a" has two LCS of length 1; pltrdy/rouge picks [b] (it moves left on ties).
    assert longest_common_subsequence(["a", "b"], ["b", "a"]) == ["b"]
    # So against the reference "a b. a" the union is {b} + {a}: R = P = 1 (the other choice would give 0.5)
    assert rouge_l("b a", "a b. a") == pytest.approx(1.0, abs=1e-7)


def test_rouge_l_scores_zero_where_the_package_raises():
    assert rouge_l("", "a reference") == 0.0
    assert rouge_l("...", "a reference") == 0.0
    assert rouge_l("a prediction", "") == 0.0


def test_rouge_l_counts_a_blank_sentence_as_one_empty_word_like_the_package():
    # "cat. " splits into "cat" and " " -> words {cat, ""}: n = 2, m = 1, overlap 1 -> F = 2/3
    assert rouge_l("cat. ", "cat") == pytest.approx(2 / 3, abs=1e-7)


def test_rouge_zh_score_segments_then_scores():
    # 我 爱 北 京 against 我 爱 上 海: LCS {我, 爱} -> R = P = 0.5
    assert rouge_zh_score("我爱北京", "我爱上海", segment=list) == pytest.approx(0.5, abs=1e-7)


# -- LongBench: classification, retrieval, count, code --------------------------------------------

CLASSES = ["location", "Other location", "Person"]


def test_classification_finds_the_gold_class_and_drops_its_substrings():
    assert classification_score("Other location", "Other location", CLASSES) == 1.0
    # "location" is dropped (a part of the gold class); "Person" stays: 1 / 2
    assert classification_score("Person or Other location", "Other location", CLASSES) == 0.5
    assert classification_score("Person", "Other location", CLASSES) == 0.0
    assert classification_score("no idea", "Other location", CLASSES) == 0.0  # LongBench's fallback never runs


def test_classification_reproduces_longbenchs_skip_after_a_removal():
    # matches [a, b, ab]; "a" is removed and the loop then skips "b", which stays: 1 / 2, not 1
    assert classification_score("ab", "ab", ["a", "b", "ab"]) == 0.5


def test_retrieval_score_is_the_share_of_numbers_naming_the_right_paragraph():
    assert retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert retrieval_score("Paragraph 3 or Paragraph 12", "Paragraph 3") == 0.5
    assert retrieval_score("I do not know", "Paragraph 3") == 0.0
    assert retrieval_zh_score("段落5", "段落5") == 1.0
    with pytest.raises(ValueError, match="paragraph"):
        retrieval_score("3", "three")


def test_count_score():
    assert count_score("There are 12 unique paragraphs, not 13.", "12") == 0.5
    assert count_score("12", 12) == 1.0
    assert count_score("twelve", "12") == 0.0


def test_fuzz_ratio_follows_fuzzywuzzy_without_levenshtein():
    assert fuzz_ratio("x = foo(1)", "x = foo(2)") == 90  # 9 matching of 10 + 10 characters
    assert fuzz_ratio("abc", "abd") == 67  # 2 * 2 / 6 = 0.667, rounded
    assert fuzz_ratio("", "") == 100 and fuzz_ratio("", "a") == 0


def test_code_sim_score_compares_the_first_line_that_is_not_a_comment():
    prediction = "\n\n# the next line\n```\nx = foo(1)\ny = 2"
    assert code_sim_score(prediction, "x = foo(2)") == pytest.approx(0.9)
    assert code_sim_score("// only comments", "x = 1") == 0.0
    assert code_sim_score("return x", "return x") == 1.0


def test_best_over_answers_takes_the_best_gold_answer():
    assert best_over_answers(qa_f1_score, "Paris", ["London", "Paris, France"]) == pytest.approx(2 / 3)
    assert best_over_answers(qa_f1_score, "Paris", []) == 0.0
    assert best_over_answers(classification_score, "Person", ["Person"], all_classes=CLASSES) == 1.0


# -- needle and pass key --------------------------------------------------------------------------


def test_keyword_recall_counts_the_references_content_words():
    reference = "The best thing to do in San Francisco is eat a sandwich"
    # content words: best, thing, san, francisco, eat, sandwich (the, to, do, in, is, a are stop words)
    assert keyword_recall("Eat a SANDWICH in Dolores Park", reference) == pytest.approx(2 / 6)
    assert keyword_recall("Sit in Dolores Park, eat a sandwich: the best thing in San Francisco", reference) == 1.0
    assert keyword_recall("it is", "it is") == 1.0  # only stop words: all of them count
    with pytest.raises(ValueError):
        keyword_recall("anything", "...")


def test_contains_answer_ignores_case_and_surrounding_space():
    assert contains_answer("The pass key is 71432.", " 71432 ") == 1.0
    assert contains_answer("ANSWER: PARIS", "paris") == 1.0
    assert contains_answer("The pass key is 71423.", "71432") == 0.0
    with pytest.raises(ValueError):
        contains_answer("x", "  ")
