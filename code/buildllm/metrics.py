"""Classification metrics and the baselines a fine-tuned model must beat.

Taught in Chapter 9 (Classification). Accuracy, macro-F1 (the mean of the classes'
F1, so a small class counts as much as a large one), the confusion matrix and a
percentile bootstrap 95 % interval (Efron & Tibshirani 1993) over the test examples.
Baselines: always predicting the training set's most frequent class, and a
bag-of-words logistic regression (scikit-learn), which sees word counts but no word
order and no pretraining.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np


def confusion_matrix(
    targets: Sequence[int], preds: Sequence[int], n_classes: int
) -> np.ndarray:
    """Return counts[i, j]: examples of true class i predicted as class j.

    Shapes: -> (C, C) int64.
    """
    counts = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(targets), np.asarray(preds)), 1)
    return counts


def accuracy(targets: Sequence[int], preds: Sequence[int]) -> float:
    """Return the fraction of predictions equal to their targets."""
    return float(np.mean(np.asarray(targets) == np.asarray(preds)))


def macro_f1(targets: Sequence[int], preds: Sequence[int], n_classes: int) -> float:
    """Return the unweighted mean over classes of F1 = 2·TP / (2·TP + FP + FN).

    A class never predicted and never present counts 0, as in scikit-learn.
    """
    counts = confusion_matrix(targets, preds, n_classes)
    tp = np.diag(counts).astype(float)  # (C,)
    denom = counts.sum(0) + counts.sum(1)  # 2·TP + FP + FN per class
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(f1.mean())


def bootstrap_interval(
    targets: Sequence[int],
    preds: Sequence[int],
    metric: Callable[[np.ndarray, np.ndarray], float] = accuracy,
    n_resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Return the percentile bootstrap 95 % interval of `metric` over the examples.

    Resamples the (target, prediction) pairs with replacement `n_resamples` times;
    the interval holds the middle 95 % of the metric's values. It measures the
    sampling noise of this test set's examples, not of its choice of plays.
    """
    targets, preds = np.asarray(targets), np.asarray(preds)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(targets), size=(n_resamples, len(targets)))
    values = [metric(targets[r], preds[r]) for r in rows]
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def majority_baseline(train_labels: Sequence[int], n: int) -> list[int]:
    """Predict the training set's most frequent class for each of `n` examples."""
    return [Counter(train_labels).most_common(1)[0][0]] * n


def bag_of_words_baseline(
    train_texts: Sequence[str],
    train_labels: Sequence[int],
    texts: Sequence[str],
    C: float = 1.0,
) -> list[int]:
    """Fit word counts + logistic regression on the training texts; predict `texts`.

    scikit-learn's `CountVectorizer` (lower-cased words of 2+ letters) and
    `LogisticRegression(C=C)` (multinomial, L2): a model that sees which words occur,
    not their order, and no pretraining. Raises ImportError naming the extra to
    install when scikit-learn is missing.
    """
    try:
        from sklearn.feature_extraction.text import CountVectorizer
        from sklearn.linear_model import LogisticRegression
    except ImportError as err:
        raise ImportError(
            "the bag-of-words baseline needs scikit-learn: pip install 'buildllm[book]'"
        ) from err
    vectorizer = CountVectorizer()
    features = vectorizer.fit_transform(train_texts)  # (N, vocabulary), sparse
    model = LogisticRegression(C=C, max_iter=2000).fit(features, train_labels)
    return model.predict(vectorizer.transform(texts)).tolist()
