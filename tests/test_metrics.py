"""Metrics against hand-computed values."""
import math

import numpy as np
import pytest
import torch

from rayapp.errors import ConfigError, DataError
from rayapp.tasks.metrics import METRICS, compute_metric


def test_accuracy():
    assert compute_metric("acc", [1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert compute_metric("acc", torch.tensor([2, 0, 1]), np.array([2, 0, 1])) == 1.0


def test_binary_f1():
    # tp = 2, fp = 1, fn = 1 -> 2*2 / (2*2 + 1 + 1)
    assert compute_metric("f1", [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]) == pytest.approx(4 / 6)
    assert compute_metric("f1", [0, 0, 0], [1, 0, 1]) == 0.0  # no true positives


def test_pearson():
    # dx = [-1, 0, 1], dy = [-4/3, -1/3, 5/3]: cov = 3, var_x = 2, var_y = 14/3
    assert compute_metric("pearson", [1.0, 2.0, 3.0], [1.0, 2.0, 4.0]) == pytest.approx(3 / math.sqrt(28 / 3))
    assert compute_metric("pearson", [3.0, 2.0, 1.0], [1.0, 2.0, 3.0]) == pytest.approx(-1.0)
    assert compute_metric("pearson", [2.5, 2.5, 2.5], [1.0, 2.0, 3.0]) == 0.0  # constant: undefined -> 0


def test_matthews():
    # tp = 2, tn = 2, fp = 1, fn = 1 -> (2*2 - 1*1) / sqrt(3*3*3*3) = 1/3
    assert compute_metric("mcc", [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]) == pytest.approx(1 / 3)
    assert compute_metric("mcc", [0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    assert compute_metric("mcc", [1, 1, 1, 1], [1, 0, 1, 0]) == 0.0  # constant prediction


def test_bad_metric_inputs():
    assert METRICS == ("acc", "f1", "pearson", "mcc")
    with pytest.raises(ConfigError, match="unknown metric 'bleu'; choose one of acc, f1, pearson, mcc"):
        compute_metric("bleu", [1], [1])
    with pytest.raises(DataError, match=r"predictions \(2,\) and labels \(3,\) must be non-empty 1-D"):
        compute_metric("acc", [1, 0], [1, 0, 1])
    with pytest.raises(DataError, match="must be non-empty"):
        compute_metric("acc", [], [])
