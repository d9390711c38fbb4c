"""The label-head table: what the submission files, metrics and plots read for each head."""

import subprocess
import sys

import numpy as np
import pytest

from abaw_jax import heads
from abaw_jax.data import affwild2

RNG = np.random.default_rng(0)

# The submission headers as the ABAW format has them (written out, not derived from the table).
HEADERS = {
    "va": "image_location,valence,arousal",
    "expr": "image_location,Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other",
    "au": "image_location,AU1,AU2,AU4,AU6,AU7,AU10,AU12,AU15,AU23,AU24,AU25,AU26",
}


def _outputs(head: heads.Head, n: int) -> np.ndarray:
    """Per-frame outputs of the head's form: VA partly beyond [-1, 1] (to be clipped),
    probabilities otherwise."""
    if head.kind == "regression":
        return RNG.uniform(-1.5, 1.5, (n, head.size))
    return RNG.random((n, head.size))


def _targets(head: heads.Head, n: int) -> np.ndarray:
    if head.kind == "regression":
        return RNG.uniform(-1, 1, (n, head.size))
    if head.kind == "classes":
        return RNG.integers(0, head.size, n)
    return RNG.integers(0, 2, (n, head.size))


def test_table_matches_the_formats():
    assert list(heads.HEADS) == ["va", "expr", "au"]
    assert {h: r.size for h, r in heads.HEADS.items()} == {"va": 2, "expr": 8, "au": 12}
    assert {h: r.header for h, r in heads.HEADS.items()} == HEADERS
    for name, head in heads.HEADS.items():
        assert head.name == name and head is heads.get(name)
        assert head.columns == affwild2.HEADERS[name]  # the annotation files' columns
    assert [h.interpolate for h in heads.HEADS.values()] == [True, False, False]
    with pytest.raises(KeyError, match=r"unknown head 'vaa'; known heads: \['au', 'expr', 'va'\]"):
        heads.get("vaa")


def test_score_is_a_key_of_the_metrics():
    for head in heads.HEADS.values():
        pred, target = _outputs(head, 50), _targets(head, 50)
        got = head.metrics(pred, target)
        assert isinstance(got[head.score], float)
        if head.kind != "binary":  # AU picks smoothing by F1 at searched thresholds
            assert head.selection_score(pred, target) == got[head.score]
    au = heads.get("au")
    pred, target = _outputs(au, 80), _targets(au, 80)
    assert au.selection_score(pred, target) == au.metrics(pred, target)["f1_mean_thresholded"]
    fixed = np.full(12, 0.3)
    assert list(au.metrics(pred, target, fixed)["thresholds"].values()) == fixed.tolist()


def test_format_values():
    va, expr, au = heads.HEADS.values()
    assert va.format_values(np.array([[0.12345, -1.5], [2.0, 0.0]])) == [
        "0.1235,-1.0000", "1.0000,0.0000"]
    assert expr.format_values(np.eye(8)[[3, 0, 7]]) == ["3", "0", "7"]
    probs = np.full((2, 12), 0.4)
    probs[1, 0] = 0.6
    thresholds = np.full(12, 0.5)
    thresholds[1] = 0.3  # per-AU thresholds, >= is active
    assert au.format_values(probs, thresholds) == ["0,1" + ",0" * 10, "1,1" + ",0" * 10]
    assert au.format_values(probs) == ["0" + ",0" * 11, "1" + ",0" * 11]


@pytest.mark.parametrize("name", list(heads.HEADS))
def test_written_values_are_valid(name):
    head = heads.get(name)
    for body in head.format_values(_outputs(head, 40), RNG.random(head.size)):
        assert head.line_problem(body.split(",")) is None, body


@pytest.mark.parametrize("name, fields, problem", [
    ("va", ["0.1"], "expected valence,arousal in [-1, 1]"),
    ("va", ["1.01", "0"], "expected valence,arousal in [-1, 1]"),
    ("va", ["nan", "0"], "expected valence,arousal in [-1, 1]"),
    ("va", ["x", "0"], "not a number"),
    ("expr", ["8"], "expected one class in 0..7"),
    ("expr", ["1", "2"], "expected one class in 0..7"),
    ("expr", ["1.0"], "not a number"),
    ("au", ["1"] * 11, "expected 12 values 0/1"),
    ("au", ["1"] * 11 + ["2"], "expected 12 values 0/1"),
    ("au", ["x"] * 12, "not a number"),
])
def test_line_problems(name, fields, problem):
    assert heads.get(name).line_problem(fields) == problem


def test_constant_baselines():
    expr = heads.get("expr")
    target = np.array([0, 0, 0, 1, 2])
    # all class 0: F1 of class 0 = 2*3/(5+3) = 0.75, the others 0 -> 0.75 / 8
    assert expr.constant_baseline(target) == pytest.approx(0.75 / 8)
    au = np.array([[1, 0], [1, 0], [0, 0], [0, 1]])
    # AU 1: all-active F1 = 2*2/(4+2); AU 2: 2*1/(4+1)
    assert heads.get("au").constant_baseline(au) == pytest.approx((4 / 6 + 2 / 5) / 2)
    assert heads.get("va").constant_baseline(np.zeros((3, 2))) == 0.0


@pytest.mark.parametrize("name", list(heads.HEADS))
def test_constant_baseline_is_the_best_constant_score(name):
    """No constant output scores better than the baseline, and one reaches it."""
    head = heads.get(name)
    target = _targets(head, 60)
    if head.kind == "regression":
        constants = [np.full(head.size, c) for c in (-0.5, 0.0, 0.3)]
    elif head.kind == "classes":
        constants = list(np.eye(head.size))
    else:
        constants = [np.zeros(head.size), np.ones(head.size)]
    scores = [head.metrics(np.tile(c, (len(target), 1)), target)[head.score] for c in constants]
    assert max(scores) == pytest.approx(head.constant_baseline(target))


def test_expression_quadrants_cover_every_class():
    quadrant = dict(zip(affwild2.EXPR_NAMES, heads.EXPR_QUADRANT, strict=True))
    assert quadrant == {"Neutral": 3, "Anger": 1, "Disgust": 1, "Fear": 1, "Happiness": 0,
                        "Sadness": 2, "Surprise": 0, "Other": 3}
    assert set(heads.EXPR_QUADRANT) == {0, 1, 2, 3}


def test_heads_imports_neither_jax_nor_matplotlib():
    # In a fresh interpreter: this test process has jax loaded already.
    code = "import sys, abaw_jax.heads; print('jax' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
