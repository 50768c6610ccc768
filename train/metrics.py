"""Evaluation metrics: compare model outputs (predictions) with references, scores in [0, 1].

Each metric has a per-example score, so callers can show which examples an adapter got
right, and optionally a corpus-level score (chrF and BLEU are defined over the corpus, not
as a mean of sentence scores). `score` returns the corpus score where there is one, else the
mean per-example score.

`is_correct` turns a per-example score into a yes/no using the metric's `threshold`: 1.0
for the exact metrics (accuracy, exact_match, json_match, numeric: their scores are 0 or 1),
0.5 for the graded ones (token_f1, rouge_l, chrf, bleu).
"""

from __future__ import annotations

import json
import math
import random
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import sacrebleu
from rouge_score import rouge_scorer

# Models quote or decorate labels ("'Positive'", "**bug**", “billing”), so strip all of these.
_EDGE_CHARS = string.whitespace + string.punctuation + "“”‘’«»„‚…"
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# The minus sign must not follow a digit, so "2021-03-05" reads as 2021, 3, 5, not 2021, -3, -5.
_NUMBER = re.compile(r"(?:(?<!\d)-)?\$?\d[\d,]*(?:\.\d+)?")
Labels = Sequence[str] | None


@dataclass(frozen=True)
class Metric:
    name: str
    per_example: Callable[[str, str], float]  # (prediction, reference) -> score in [0, 1]
    corpus: Callable[[list[str], list[str]], float] | None = None
    threshold: float = 1.0  # per-example score at or above which `is_correct` says yes


def normalize_label(text: str) -> str:
    """First line, lowercased, edge punctuation and quotes stripped, inner whitespace collapsed."""
    lines = text.strip().splitlines()
    first = lines[0] if lines else ""
    return " ".join(first.lower().strip(_EDGE_CHARS).split())


def snap_to_label(prediction: str, labels: Sequence[str]) -> str:
    """The label a prediction starts with ("Positive sentiment." -> "positive"), else itself.

    Labels match whole words, longest first: "positively" is not "positive", and the label
    "bug report" wins over "bug".
    """
    text = normalize_label(prediction)
    for label in sorted(labels, key=lambda lab: len(normalize_label(lab)), reverse=True):
        norm = normalize_label(label)
        if norm and re.match(re.escape(norm) + r"(?!\w)", text):
            return label
    return prediction


def _accuracy(prediction: str, reference: str) -> float:
    return float(normalize_label(prediction) == normalize_label(reference))


def _exact_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def _same_json(a: object, b: object) -> bool:
    # Python says True == 1 and {"x": 1} == {"x": True}; JSON does not.
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b))
    return a == b


def _json_match(prediction: str, reference: str) -> float:
    try:
        expected = json.loads(reference)
    except json.JSONDecodeError as err:
        raise ValueError(f"json_match reference is not valid JSON ({err}): {reference!r}") from None
    try:
        actual = json.loads(prediction)
    except json.JSONDecodeError:
        return 0.0
    return float(_same_json(actual, expected))


def _squad_tokens(text: str) -> list[str]:
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return _ARTICLES.sub(" ", text).split()


def _token_f1(prediction: str, reference: str) -> float:
    pred, ref = _squad_tokens(prediction), _squad_tokens(reference)
    if not pred or not ref:
        # SQuAD's rule: an empty answer is right only when the other side is empty too.
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@cache
def _rouge() -> rouge_scorer.RougeScorer:
    # Built on first use, not at import; its default tokenizer keeps only [a-z0-9] tokens,
    # so text in other scripts scores 0.
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _rouge_l(prediction: str, reference: str) -> float:
    return float(_rouge().score(target=reference, prediction=prediction)["rougeL"].fmeasure)


# sacrebleu reports 0-100 (and 100.00000000000004 for identical text); sentence_bleu uses
# effective order so a short sentence is not 0 for lack of 4-grams.
def _chrf(prediction: str, reference: str) -> float:
    return min(1.0, sacrebleu.sentence_chrf(prediction, [reference]).score / 100)


def _chrf_corpus(predictions: list[str], references: list[str]) -> float:
    return min(1.0, sacrebleu.corpus_chrf(predictions, [references]).score / 100)


def _bleu(prediction: str, reference: str) -> float:
    return min(1.0, sacrebleu.sentence_bleu(prediction, [reference]).score / 100)


def _bleu_corpus(predictions: list[str], references: list[str]) -> float:
    return min(1.0, sacrebleu.corpus_bleu(predictions, [references]).score / 100)


def extract_number(text: str) -> float | None:
    """The first number after '####' (GSM8K's answer marker) if there is one, else the last number.

    Commas and '$' are dropped: "$1,234.50" -> 1234.5.
    """
    marker = text.find("####")
    found = _NUMBER.findall(text[marker + 4 :]) if marker >= 0 else _NUMBER.findall(text)[-1:]
    if not found:
        return None
    return float(found[0].replace(",", "").replace("$", ""))


def _numeric(prediction: str, reference: str) -> float:
    expected = extract_number(reference)
    if expected is None:
        raise ValueError(f"numeric reference has no number: {reference!r}")
    actual = extract_number(prediction)
    return float(actual is not None and math.isclose(actual, expected, abs_tol=1e-6))


METRICS: dict[str, Metric] = {
    m.name: m
    for m in [
        Metric("accuracy", _accuracy),
        Metric("exact_match", _exact_match),
        Metric("json_match", _json_match),
        Metric("token_f1", _token_f1, threshold=0.5),
        Metric("rouge_l", _rouge_l, threshold=0.5),
        Metric("chrf", _chrf, _chrf_corpus, threshold=0.5),
        Metric("bleu", _bleu, _bleu_corpus, threshold=0.5),
        Metric("numeric", _numeric),
    ]
}


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; valid metrics: {', '.join(METRICS)}")
    return METRICS[name]


def _prepare(
    metric: str, predictions: list[str], references: list[str], labels: Labels
) -> tuple[Metric, list[str]]:
    m = get_metric(metric)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if labels is None:
        return m, list(predictions)
    if m.name != "accuracy":
        raise ValueError(f"labels only apply to the accuracy metric, not {m.name!r}")
    return m, [snap_to_label(p, labels) for p in predictions]


def score(
    metric: str, predictions: list[str], references: list[str], *, labels: Labels = None
) -> float:
    """The metric over all examples, in [0, 1].

    `labels` (accuracy only) first maps each prediction to the label it starts with, so a
    model that answers "Positive." or "positive sentiment" for "positive" is counted right.
    """
    m, predictions = _prepare(metric, predictions, references, labels)
    if not predictions:
        raise ValueError(f"no examples to score with {metric!r}")
    if m.corpus is not None:
        return m.corpus(predictions, list(references))
    return sum(map(m.per_example, predictions, references)) / len(predictions)


def score_examples(
    metric: str, predictions: list[str], references: list[str], *, labels: Labels = None
) -> list[float]:
    """Per-example scores, in the order given (sentence-level for chrF and BLEU)."""
    m, predictions = _prepare(metric, predictions, references, labels)
    return list(map(m.per_example, predictions, references))


def is_correct(metric: str, prediction: str, reference: str, *, labels: Labels = None) -> bool:
    """Whether one example counts as right: score == 1 for exact metrics, >= 0.5 for graded ones."""
    m, [prediction] = _prepare(metric, [prediction], [reference], labels)
    return m.per_example(prediction, reference) >= m.threshold


BOOTSTRAP_RESAMPLES = 1000  # corpus metrics (chrF, BLEU) recompute per resample: they take 200


def bootstrap_interval(metric: str, predictions: list[str], references: list[str], *, labels: Labels = None,
                       level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `score` over the examples (seeded, so reruns agree).

    With 40 test examples one example moves accuracy by 0.025: the interval says which
    differences between two adapters the eval set can resolve at all.
    """
    m, predictions = _prepare(metric, predictions, references, labels)
    n = len(predictions)
    if n == 0:
        raise ValueError(f"no examples to score with {metric!r}")
    rng = random.Random(seed)
    if m.corpus is None:
        per = list(map(m.per_example, predictions, references))
        stats = [sum(per[i] for i in rng.choices(range(n), k=n)) / n for _ in range(BOOTSTRAP_RESAMPLES)]
    else:
        stats = []
        for _ in range(BOOTSTRAP_RESAMPLES // 5):
            picks = rng.choices(range(n), k=n)
            stats.append(m.corpus([predictions[i] for i in picks], [references[i] for i in picks]))
    stats.sort()
    tail = (1 - level) / 2
    return stats[int(tail * (len(stats) - 1))], stats[math.ceil((1 - tail) * (len(stats) - 1))]
