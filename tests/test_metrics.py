"""Metrics against scikit-learn / numpy references, losses against direct formulas."""

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import f1_score

from abaw_jax import heads, losses, metrics, postprocess, submission, tasks
from abaw_jax.data import affwild2

RNG = np.random.default_rng(0)


def _ccc_reference(x, y):
    r = np.corrcoef(x, y)[0, 1]
    return 2 * r * x.std() * y.std() / (x.var() + y.var() + (x.mean() - y.mean()) ** 2)


def test_ccc_matches_reference_and_loss():
    x = RNG.normal(size=500)
    y = 0.6 * x + RNG.normal(scale=0.5, size=500) + 0.2
    assert metrics.ccc(x, y) == pytest.approx(_ccc_reference(x, y), abs=1e-9)
    assert metrics.ccc(x, x) == pytest.approx(1.0)
    pred, target = np.stack([x, -x], 1), np.stack([y, y], 1)
    mask = np.ones(500, bool)
    mask[:100] = False  # masked rows must not count, whatever they hold
    pred[:100] = 100.0
    want = 1 - (_ccc_reference(x[100:], y[100:]) + _ccc_reference(-x[100:], y[100:])) / 2
    got = losses.ccc_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask))
    assert float(got) == pytest.approx(want, abs=1e-5)
    assert float(losses.ccc_loss(jnp.asarray(pred), jnp.asarray(target),
                                 jnp.zeros(500, bool))) == 0.0


def test_f1_metrics_match_sklearn():
    target = RNG.integers(0, 8, 400)
    probs = RNG.random((400, 8))
    probs[np.arange(400), target] += RNG.random(400)  # better than chance
    got = metrics.expr_metrics(probs, target)
    want = f1_score(target, probs.argmax(-1), average="macro", labels=range(8), zero_division=0)
    assert got["f1_macro"] == pytest.approx(want)
    au = RNG.integers(0, 2, (400, 12))
    au[:, 3] = 0  # an AU never active: F1 0 by convention, as sklearn with zero_division=0
    p = np.clip(au * 0.3 + RNG.random((400, 12)) * 0.7, 0, 1)
    want_au = [f1_score(au[:, k], p[:, k] >= 0.5, zero_division=0) for k in range(12)]
    np.testing.assert_allclose(metrics.au_f1(p, au), want_au)


def test_threshold_search_beats_half_on_a_planted_case():
    target = RNG.integers(0, 2, (2000, 12))
    # probabilities that are informative but shifted low: 0.5 misses most positives
    probs = np.clip(0.15 + 0.25 * target + RNG.normal(scale=0.08, size=target.shape), 0, 1)
    res = metrics.au_metrics(probs, target)
    assert res["f1_mean_thresholded"] > res["f1_mean_at_0.5"] + 0.3
    assert all(0.2 < t < 0.4 for t in res["thresholds"].values())


def test_au_score_is_the_thresholded_f1_and_per_au_values_are_named():
    target = RNG.integers(0, 2, (1000, 12))
    probs = np.clip(0.15 + 0.25 * target + RNG.normal(scale=0.08, size=target.shape), 0, 1)
    labels = {"au": target, "au_mask": np.ones(1000, bool)}
    m = tasks.get("au").metrics({"au": probs}, labels)
    # The score (best checkpoint, metrics.json) is F1 at the thresholds a submission applies.
    assert m["score"] == m["au/f1_mean_thresholded"] > m["au/f1_mean_at_0.5"] + 0.3
    names = list(affwild2.AU_NAMES)
    for key in ("au/f1_per_au_at_0.5", "au/f1_per_au_thresholded", "au/thresholds"):
        assert list(m[key]) == names
    assert np.mean(list(m["au/f1_per_au_thresholded"].values())) == pytest.approx(
        m["au/f1_mean_thresholded"])
    # The thresholds searched after smoothing are named too; a checkpoint's stored thresholds
    # read back in AU order, named or (older checkpoints) a list.
    _, report = postprocess.Post.fit(("au",), {"au": probs}, labels, np.zeros(1000, int),
                                     np.arange(1, 1001))
    assert list(report["post/au/thresholds"]) == names
    named = postprocess.Post.from_metrics(report, ("au",)).thresholds
    old = {"post/au/thresholds": list(report["post/au/thresholds"].values())}
    np.testing.assert_array_equal(named, postprocess.Post.from_metrics(old, ("au",)).thresholds)
    assert 0.2 < named.mean() < 0.4


def test_cross_entropy_and_bce_with_weights_match_formulas():
    logits = RNG.normal(size=(16, 8)).astype(np.float32)
    labels = RNG.integers(0, 8, 16)
    mask = RNG.random(16) > 0.3
    w = RNG.random(8) + 0.5
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -logp[np.arange(16), labels]
    want = np.sum((nll * w[labels])[mask]) / np.sum(w[labels][mask])
    got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask), w)
    assert float(got) == pytest.approx(want, rel=1e-5)
    z = RNG.normal(size=(16, 12)).astype(np.float32)
    y = RNG.integers(0, 2, (16, 12))
    pw = RNG.random(12) + 1
    sig = 1 / (1 + np.exp(-z))
    per = -(pw * y * np.log(sig) + (1 - y) * np.log(1 - sig))
    want = per.mean(-1)[mask].mean()
    got = losses.binary_cross_entropy(jnp.asarray(z), jnp.asarray(y), jnp.asarray(mask), pw)
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_contrastive_loss_matches_equations_1_to_3_with_shared_classes_and_masked_frames():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 8)) * 3
    labels = np.array([2, 5, 2, 7, 5, 1])  # classes 2 and 5 shared by two images each
    mask = np.array([True, True, True, False, True, True])  # frame 3 is not a pair at all
    pairs = [i for i in range(6) if mask[i]]
    # S[i, j]: image i against the prompt of pair j; soft targets over pairs of one class.
    s = np.array([[logits[i, labels[j]] for j in pairs] for i in pairs])
    t = np.array([[float(labels[i] == labels[j]) for j in pairs] for i in pairs])
    t /= t.sum(1, keepdims=True)

    def ce(rows):
        log_p = rows - np.log(np.exp(rows).sum(1, keepdims=True))
        return -(t * log_p).sum(1).mean()

    expected = (ce(s) + ce(s.T)) / 2  # (L_img + L_text) / 2
    got = losses.contrastive(jnp.asarray(logits, jnp.float32), jnp.asarray(labels),
                             jnp.asarray(mask))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # A masked frame's logits change nothing; with no valid frame the loss is 0.
    moved = logits.copy()
    moved[3] += 100
    np.testing.assert_allclose(losses.contrastive(jnp.asarray(moved, jnp.float32),
                                                  jnp.asarray(labels), jnp.asarray(mask)),
                               expected, rtol=1e-5)
    assert float(losses.contrastive(jnp.asarray(logits), jnp.asarray(labels),
                                    jnp.zeros(6, bool))) == 0.0


def test_head_diversity():
    a, b, c = (jnp.asarray(RNG.random((2, 7, 7, 4)), jnp.float32) for _ in range(3))
    mse = lambda u, v: float(jnp.mean((u - v) ** 2))  # noqa: E731
    want = 3 / (mse(a, b) + mse(a, c) + mse(b, c) + np.finfo(np.float32).eps)
    assert float(losses.head_diversity([a, b, c])) == pytest.approx(want, rel=1e-5)
    assert float(losses.head_diversity([a])) == 0.0


def test_mtl_task_reports_p_score_with_parts():
    n = 300
    labels = {"va": RNG.uniform(-1, 1, (n, 2)), "expr": RNG.integers(0, 8, n),
              "au": RNG.integers(0, 2, (n, 12)), "va_mask": RNG.random(n) > 0.1,
              "expr_mask": RNG.random(n) > 0.5, "au_mask": np.ones(n, bool)}
    preds = {"va": labels["va"] + RNG.normal(scale=0.3, size=(n, 2)),
             "expr": np.eye(8)[labels["expr"]] + RNG.random((n, 8)),
             "au": np.clip(labels["au"] * 0.6 + RNG.random((n, 12)) * 0.4, 0, 1)}
    m = tasks.get("mtl").metrics(preds, labels)
    assert m["p_score"] == pytest.approx(
        m["va/ccc_mean"] + m["expr/f1_macro"] + m["au/f1_mean_at_0.5"])
    # The score that picks the best checkpoint: AU at the thresholds a submission applies.
    assert m["score"] == m["p_score_thresholded"] == pytest.approx(
        m["va/ccc_mean"] + m["expr/f1_macro"] + m["au/f1_mean_thresholded"])
    assert m["expr/frames"] == labels["expr_mask"].sum()
    with pytest.raises(KeyError, match="unknown task 'vaa'"):
        tasks.get("vaa")


def test_submission_fill_and_lines():
    frames = np.array([1, 2, 5])
    va = np.array([[0.0, 0.0], [0.2, -0.2], [0.8, -0.8]])
    filled = submission.fill(frames, va, 6, interpolate=True)
    np.testing.assert_allclose(filled[:, 0], [0, 0.2, 0.4, 0.6, 0.8, 0.8])
    probs = np.eye(8)[[3, 5, 1]]
    nearest = submission.fill(frames, probs, 6, interpolate=False)
    assert list(nearest.argmax(-1)) == [3, 5, 5, 1, 1, 1]
    lines = submission.format_lines("expr", "vid_left", nearest)
    assert lines[0] == heads.get("expr").header and lines[1] == "vid_left/00001.jpg,3"
    assert len(lines) == 7


def test_head_losses_are_picked_by_name():
    task = tasks.get("mtl")
    task.check_losses({"va": "ccc", "expr": "ce", "au": "bce"})
    with pytest.raises(KeyError, match=r"loss.expr='focal' is not a loss of head 'expr'.*"
                                       r"\['ce', 'coarse_fine', 'contrastive'\]"):
        task.check_losses({"expr": "focal"})
    assert losses.head_loss("va", "ccc") is losses.HEAD_LOSSES["va"]["ccc"]
