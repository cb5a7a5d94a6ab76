"""Evaluation metrics of the built-in tasks: acc, binary F1 (MRPC/QQP),
Pearson (STS-B), Matthews correlation (CoLA).

Values are fractions in [0, 1] (correlations in [-1, 1]), never percentages; the report
scales them. Where a metric is undefined (a constant prediction or label vector makes a
correlation 0/0, no positives makes F1 0/0) it is 0.0, as in scikit-learn, so that a
degenerate model ranks last in model selection instead of poisoning it with NaN.
"""
from __future__ import annotations

import numpy as np

from rayapp.errors import ConfigError, DataError

METRICS = ("acc", "f1", "pearson", "mcc")


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predictions == labels))


def binary_f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """F1 of the positive class, index 1."""
    predicted, actual = predictions == 1, labels == 1
    tp = np.sum(predicted & actual)
    return float(2 * tp / (predicted.sum() + actual.sum())) if tp else 0.0


def _correlation(numerator: float, variance_product: float) -> float:
    return float(numerator / np.sqrt(variance_product)) if variance_product > 0 else 0.0


def pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    p = predictions.astype(np.float64) - predictions.mean()
    y = labels.astype(np.float64) - labels.mean()
    return _correlation(np.dot(p, y), np.dot(p, p) * np.dot(y, y))


def matthews(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation via the confusion matrix (Gorodkin's multi-class form; equals
    (tp*tn - fp*fn) / sqrt(...) for two classes)."""
    classes, encoded = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
    y, p = encoded[: len(labels)], encoded[len(labels) :]
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(confusion, (y, p), 1)
    true, pred, n = confusion.sum(1), confusion.sum(0), confusion.sum()
    numerator = np.trace(confusion) * n - np.dot(true, pred)
    return _correlation(numerator, (n * n - np.dot(pred, pred)) * (n * n - np.dot(true, true)))


_FUNCTIONS = {"acc": accuracy, "f1": binary_f1, "pearson": pearson, "mcc": matthews}


def compute_metric(name: str, predictions, labels) -> float:
    """`name` of `predictions` against `labels` (sequences, numpy arrays or CPU tensors)."""
    if name not in _FUNCTIONS:
        raise ConfigError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}")
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape or predictions.ndim != 1 or len(labels) == 0:
        raise DataError(
            f"metric {name}: predictions {predictions.shape} and labels {labels.shape} must be "
            "non-empty 1-D sequences of the same length"
        )
    return _FUNCTIONS[name](predictions, labels)
