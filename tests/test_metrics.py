"""Metrics against hand-computed values of a small accuracy matrix."""
import pytest

from clipcl.evaluate import (average_incremental_accuracy, backward_transfer, forgetting, future_accuracy,
                             last_accuracy, metrics, seen_accuracy)

# 3 tasks, CIL: None above the diagonal. Test sizes 100, 100, 200.
R = [[0.9, None, None],
     [0.6, 0.8, None],
     [0.3, 0.5, 0.7]]
SIZES = [100, 100, 200]


def test_seen_accuracy_is_weighted_by_test_size():
    assert seen_accuracy(R, SIZES, 0) == pytest.approx(0.9)
    assert seen_accuracy(R, SIZES, 1) == pytest.approx(0.7)
    assert seen_accuracy(R, SIZES, 2) == pytest.approx((30 + 50 + 140) / 400)


def test_average_incremental_and_last():
    assert average_incremental_accuracy(R, SIZES) == pytest.approx((0.9 + 0.7 + 0.55) / 3)
    assert last_accuracy(R, SIZES) == pytest.approx(0.55)


def test_forgetting_uses_best_earlier_accuracy():
    # task 0: best of (0.9, 0.6) = 0.9 -> 0.3 ; task 1: best of (0.8) -> 0.5
    assert forgetting(R) == pytest.approx(((0.9 - 0.3) + (0.8 - 0.5)) / 2)
    # the maximum, not the diagonal: a task that improved after its own step
    improved = [[0.5, None, None], [0.9, 0.8, None], [0.4, 0.8, 0.6]]
    assert forgetting(improved) == pytest.approx(((0.9 - 0.4) + (0.8 - 0.8)) / 2)


def test_backward_transfer():
    assert backward_transfer(R) == pytest.approx(((0.3 - 0.9) + (0.5 - 0.8)) / 2)


def test_single_task_and_future_accuracy():
    assert forgetting([[0.7]]) == 0.0 and backward_transfer([[0.7]]) == 0.0
    assert future_accuracy([]) is None and future_accuracy([0.5]) is None
    # the first entry (before any training) is not a "future task after learning": left out
    assert future_accuracy([0.5, 0.2, None, 0.3]) == pytest.approx((0.2 + 0.3) / 2)
    dil = [[0.9, 0.2, 0.1], [0.8, 0.9, 0.3], [0.7, 0.8, 0.9]]
    m = metrics(dil, [1, 1, 1], before=[0.1, 0.2, 0.3])
    assert m["future_accuracy"] == pytest.approx(0.25)
    assert m["last_accuracy"] == pytest.approx(0.8)
    assert m["forgetting"] == pytest.approx(((0.9 - 0.7) + (0.9 - 0.8)) / 2)
