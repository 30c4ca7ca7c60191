"""Tests for buildllm.metrics against scikit-learn and numpy's own percentiles."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as sk

from buildllm.metrics import (
    accuracy,
    bag_of_words_baseline,
    bootstrap_interval,
    confusion_matrix,
    macro_f1,
    majority_baseline,
)


def _labels(seed: int = 0, n: int = 200, n_classes: int = 3):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, n_classes, n)
    preds = np.where(rng.random(n) < 0.6, targets, rng.integers(0, n_classes, n))
    return targets.tolist(), preds.tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accuracy_macro_f1_and_confusion_equal_scikit_learns(seed):
    targets, preds = _labels(seed)
    assert accuracy(targets, preds) == pytest.approx(sk.accuracy_score(targets, preds))
    assert macro_f1(targets, preds, 3) == pytest.approx(
        sk.f1_score(targets, preds, average="macro")
    )
    np.testing.assert_array_equal(
        confusion_matrix(targets, preds, 3), sk.confusion_matrix(targets, preds)
    )


def test_macro_f1_counts_a_class_never_predicted_as_zero_like_scikit_learn():
    targets, preds = [0, 0, 1, 1, 2], [0, 0, 1, 1, 1]
    expected = sk.f1_score(targets, preds, average="macro", zero_division=0)
    assert macro_f1(targets, preds, 3) == pytest.approx(expected)


def test_bootstrap_interval_is_the_percentiles_of_resampled_accuracies():
    targets, preds = _labels(3, n=300)
    low, high = bootstrap_interval(targets, preds, n_resamples=500, seed=4)
    rng = np.random.default_rng(4)
    rows = rng.integers(0, 300, size=(500, 300))
    t, p = np.asarray(targets), np.asarray(preds)
    values = (t[rows] == p[rows]).mean(axis=1)
    assert (low, high) == pytest.approx(tuple(np.percentile(values, [2.5, 97.5])))
    assert low < accuracy(targets, preds) < high


def test_baselines_predict_the_majority_and_separate_word_topics():
    assert majority_baseline([2, 0, 2, 1], 3) == [2, 2, 2]
    texts = ["the king and the crown", "a crown for the king", "love and a wedding",
             "the wedding of love"] * 5  # fmt: skip
    labels = [0, 0, 1, 1] * 5
    preds = bag_of_words_baseline(texts, labels, ["king crown", "love wedding"])
    assert preds == [0, 1]
