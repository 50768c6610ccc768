"""The evaluation metrics, as a table: (metric, prediction, reference) -> expected score."""

import pytest

from mtft.train.metrics import METRICS, extract_number, is_correct, score, score_examples

GSM8K_REFERENCE = "She sells 1200 + 34 = <<1200+34=1234>>1234 eggs.\n#### 1234"

EXACT = [
    # accuracy: case, edge punctuation and quotes, inner spaces and later lines do not matter
    ("accuracy", "Positive.", "positive", 1.0),
    ("accuracy", '  "Billing" ', "billing", 1.0),
    ("accuracy", "**bug**", "bug", 1.0),
    ("accuracy", "not   sure", "Not sure", 1.0),
    ("accuracy", "shipping\nBecause the parcel is late.", "shipping", 1.0),
    ("accuracy", "negative", "positive", 0.0),
    ("accuracy", "positive sentiment", "positive", 0.0),  # without labels, no prefix matching
    ("accuracy", "", "positive", 0.0),
    # exact_match: only surrounding whitespace is forgiven
    ("exact_match", " 2021-03-05\n", "2021-03-05", 1.0),
    ("exact_match", "2021-3-5", "2021-03-05", 0.0),
    ("exact_match", "Hello", "hello", 0.0),
    # json_match: equal as objects, whatever the key order or spacing
    ("json_match", '{"age": 34, "name": "Ana"}', '{"name": "Ana", "age": 34}', 1.0),
    ("json_match", '{"name":"Ana","age":34}', '{"name": "Ana", "age": 34}', 1.0),
    ("json_match", '{"name": "Ana", "age": 34.0}', '{"name": "Ana", "age": 34}', 1.0),
    ("json_match", '{"name": "Ana", "age": "34"}', '{"name": "Ana", "age": 34}', 0.0),
    ("json_match", '{"flag": 1}', '{"flag": true}', 0.0),
    ("json_match", '{"name": "Ana"}', '{"name": "Ana", "age": 34}', 0.0),
    ("json_match", '{"name": "Ana", "age": 34', '{"name": "Ana", "age": 34}', 0.0),
    ("json_match", 'Sure! {"name": "Ana"}', '{"name": "Ana"}', 0.0),
    ("json_match", "", '{"name": "Ana"}', 0.0),
    # numeric: GSM8K's '#### N' in the reference, else the last number; commas and '$' dropped
    ("numeric", "The answer is 1,234.", GSM8K_REFERENCE, 1.0),
    ("numeric", "#### 1234", GSM8K_REFERENCE, 1.0),
    ("numeric", "Step 1: 12 eggs. Step 2: $1,234.00", GSM8K_REFERENCE, 1.0),
    ("numeric", "#### 1234\n#### 99 (the model rambles on)", GSM8K_REFERENCE, 1.0),
    ("numeric", "1234 eggs, minus 4, leaves 1230", GSM8K_REFERENCE, 0.0),
    ("numeric", "The answer is 1234.5", GSM8K_REFERENCE, 0.0),
    ("numeric", "I do not know", GSM8K_REFERENCE, 0.0),
    ("numeric", "-7", "It dropped to -7 degrees", 1.0),
    ("numeric", "0.1 + 0.2 = 0.30000000000000004", "0.3", 1.0),  # within 1e-6
    ("numeric", "0.301", "0.3", 0.0),
]

GRADED = [
    # token_f1: SQuAD normalisation drops case, punctuation and articles
    ("token_f1", "The Eiffel Tower!", "eiffel tower", 1.0),
    ("token_f1", "eiffel", "eiffel tower", pytest.approx(2 / 3)),
    ("token_f1", "a cat", "the dog", 0.0),
    ("token_f1", "", "", 1.0),
    ("token_f1", "", "dog", 0.0),
    # rouge_l: stemmed longest common subsequence
    ("rouge_l", "the cats were running", "the cat was running", pytest.approx(0.75)),
    ("rouge_l", "the cat sat on the mat", "the cat sat on the mat", 1.0),
]

IDENTICAL = "a small model learns a new task from four hundred examples"
UNRELATED = "quarterly revenue grew despite supply problems"


@pytest.mark.parametrize(("metric", "prediction", "reference", "expected"), EXACT + GRADED)
def test_per_example_score(metric, prediction, reference, expected):
    assert score(metric, [prediction], [reference]) == expected
    assert score_examples(metric, [prediction], [reference]) == [expected]


@pytest.mark.parametrize(("metric", "prediction", "reference", "expected"), EXACT)
def test_exact_metrics_are_correct_only_at_one(metric, prediction, reference, expected):
    assert is_correct(metric, prediction, reference) is (expected == 1.0)


@pytest.mark.parametrize("metric", ["token_f1", "rouge_l", "chrf", "bleu"])
def test_graded_metrics_identical_is_one_and_unrelated_is_low(metric):
    assert score(metric, [IDENTICAL], [IDENTICAL]) == pytest.approx(1.0)
    assert score(metric, [UNRELATED], [IDENTICAL]) < 0.3
    assert is_correct(metric, IDENTICAL, IDENTICAL)
    assert not is_correct(metric, UNRELATED, IDENTICAL)


@pytest.mark.parametrize("metric", list(METRICS))
def test_scores_lie_in_unit_interval_and_average_examples(metric):
    references = ['{"n": 1}', '{"n": 2}', '{"n": 3}', '{"n": 4}']
    predictions = ['{"n": 1}', '{"n": 2}', "n is three", '{"n": 5}']
    value = score(metric, predictions, references)
    assert 0.0 <= value <= 1.0
    if METRICS[metric].corpus is None:
        per_example = score_examples(metric, predictions, references)
        assert value == pytest.approx(sum(per_example) / len(per_example))


def test_exact_metrics_average_to_the_fraction_right():
    assert score("accuracy", ["billing", "Bug.", "shipping", "account"], ["billing"] * 4) == 0.25
    assert score("numeric", ["#### 3", "3", "4"], ["3", "3", "3"]) == pytest.approx(2 / 3)


def test_chrf_and_bleu_are_corpus_level_not_a_mean_of_sentences():
    predictions = ["the cat sat on the mat today", "completely different words here"]
    references = ["the cat sat on the mat today", "a dog slept under a table"]
    for metric in ("chrf", "bleu"):
        mean = sum(score_examples(metric, predictions, references)) / 2
        assert score(metric, predictions, references) != pytest.approx(mean)


LABELS = ["positive", "negative", "neutral"]


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("Positive.", "positive", True),
        ("positive sentiment", "positive", True),
        ("Negative - the reviewer hated it", "negative", True),
        ("'neutral'\nsince it is mixed", "neutral", True),
        ("positively", "positive", False),  # labels match whole words only
        ("It is positive", "positive", False),  # the label must come first
        ("negative", "positive", False),
    ],
)
def test_accuracy_with_labels_takes_the_label_the_prediction_starts_with(
    prediction, reference, expected
):
    assert is_correct("accuracy", prediction, reference, labels=LABELS) is expected
    assert score("accuracy", [prediction], [reference], labels=LABELS) == float(expected)


def test_the_longest_matching_label_wins():
    labels = ["bug", "bug report"]
    assert score("accuracy", ["Bug report: crash"], ["bug report"], labels=labels) == 1.0
    assert score("accuracy", ["bug, clearly"], ["bug"], labels=labels) == 1.0


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("The answer is 1,234.", 1234.0),
        ("cost $12.50 in total", 12.5),
        ("Loss of -$5 then", -5.0),
        ("on 2021-03-05", 5.0),  # a hyphen between digits is not a minus sign
        ("work... #### 72\n", 72.0),
        ("no digits here", None),
    ],
)
def test_extract_number(text, number):
    assert extract_number(text) == number


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: score("acc", ["a"], ["a"]), r"unknown metric 'acc'; valid metrics: accuracy, "),
        (lambda: is_correct("f1", "a", "a"), r"valid metrics: .*token_f1"),
        (lambda: score("accuracy", ["a", "b"], ["a"]), r"2 predictions but 1 references"),
        (lambda: score("accuracy", [], []), r"no examples to score with 'accuracy'"),
        (lambda: score("rouge_l", ["a"], ["a"], labels=["a"]), r"labels only apply to .*accuracy"),
        (lambda: score("json_match", ["{}"], ["{name: 1}"]), r"reference is not valid JSON"),
        (lambda: score("numeric", ["4"], ["four"]), r"numeric reference has no number: 'four'"),
    ],
)
def test_bad_calls_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_the_bootstrap_interval_matches_the_binomial_spread_and_collapses_when_every_answer_is_right():
    from mtft.train.metrics import bootstrap_interval

    refs = ["yes"] * 100
    half = ["yes"] * 50 + ["no"] * 50
    low, high = bootstrap_interval("accuracy", half, refs)
    # Binomial: 0.5 ± 1.96 · sqrt(0.25 / 100) = [0.402, 0.598]
    assert low == pytest.approx(0.402, abs=0.025) and high == pytest.approx(0.598, abs=0.025)
    assert bootstrap_interval("accuracy", refs, refs) == (1.0, 1.0)
    wide = bootstrap_interval("accuracy", ["yes"] * 5 + ["no"] * 5, refs[:10])
    assert wide[1] - wide[0] > high - low  # ten examples resolve less than a hundred
    low_c, high_c = bootstrap_interval("chrf", ["the cat sat"] * 10 + ["a dog"] * 10, ["the cat sat"] * 20)
    assert 0 < low_c < high_c < 1
