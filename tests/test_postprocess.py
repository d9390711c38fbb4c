"""Temporal smoothing and its choice on validation; the submission checker."""

import numpy as np
import pytest
from scipy import ndimage

from abaw_jax import postprocess, submission


def test_filters_match_scipy():
    x = np.random.default_rng(0).normal(size=(200, 2))
    np.testing.assert_allclose(postprocess.gaussian(x, 3.0),
                               ndimage.gaussian_filter1d(x, 3.0, axis=0, mode="nearest",
                                                         truncate=3.0), atol=1e-12)
    np.testing.assert_allclose(postprocess.moving_mean(x, 9),
                               ndimage.uniform_filter1d(x, 9, axis=0, mode="nearest"),
                               atol=1e-12)
    with pytest.raises(ValueError, match="odd"):
        postprocess.moving_mean(x, 4)


def _planted(rng, videos=6, frames=300, noise=0.4):
    """Smooth per-video VA signals, predictions = signal + white noise; some frames missing."""
    video, frame, truth = [], [], []
    for v in range(videos):
        t = np.arange(1, frames + 1)
        keep = rng.random(frames) > 0.1  # 10 % of the frames have no crop
        signal = np.stack([np.sin(t / (15 + 5 * v)), np.cos(t / (20 + 3 * v))], -1) * 0.8
        video.append(np.full(keep.sum(), v))
        frame.append(t[keep])
        truth.append(signal[keep])
    truth = np.concatenate(truth)
    pred = truth + rng.normal(scale=noise, size=truth.shape)
    return np.concatenate(video), np.concatenate(frame), pred, truth


def test_smoothing_reduces_planted_noise_and_is_chosen_on_validation():
    rng = np.random.default_rng(1)
    video, frame, pred, truth = _planted(rng)
    smoothed = postprocess.smooth_rows(pred, video, frame, postprocess.Smoothing("gaussian", 4))
    assert np.mean((smoothed - truth) ** 2) < 0.2 * np.mean((pred - truth) ** 2)
    labels = {"va": truth, "va_mask": np.ones(len(truth), bool)}
    post, report = postprocess.Post.fit(("va",), {"va": pred}, labels, video, frame)
    assert post.smoothing["va"].method != "none"
    assert report["post/va/score"] > report["post/va/score_raw"] + 0.1
    # Stored with the checkpoint's metrics and read back by predict.
    again = postprocess.Post.from_metrics(report, ("va",))
    assert again.smoothing == post.smoothing


def test_windows_never_cross_videos():
    # Two videos with constant, very different outputs: smoothing must leave both unchanged.
    video = np.repeat([0, 1], 50)
    frame = np.tile(np.arange(1, 51), 2)
    pred = np.where(video[:, None] == 0, -0.9, 0.9) * np.ones((100, 2))
    out = postprocess.smooth_rows(pred, video, frame, postprocess.Smoothing("mean", 33))
    np.testing.assert_allclose(out, pred)


def test_smoothing_is_applied_before_au_thresholds():
    rng = np.random.default_rng(2)
    n = 600
    video, frame = np.zeros(n, int), np.arange(1, n + 1)
    active = (np.sin(frame / 25.0) > 0.3)[:, None].repeat(12, 1).astype(int)
    probs = np.clip(0.25 + 0.3 * active + rng.normal(scale=0.25, size=active.shape), 0, 1)
    labels = {"au": active, "au_mask": np.ones(n, bool)}
    post, report = postprocess.Post.fit(("au",), {"au": probs}, labels, video, frame)
    assert report["post/au/score"] > report["post/au/score_raw"]
    assert post.thresholds.shape == (12,) and post.smoothing["au"].method != "none"


def test_checker_accepts_written_files_and_names_the_first_bad_line(tmp_path):
    videos, lengths = ["a", "b_left"], {"a": 5, "b_left": 3}
    video = np.array([0, 0, 0, 1, 1])
    frame = np.array([1, 3, 5, 1, 3])  # frames 2, 4 of a and 2 of b_left have no crop
    for head, values in (("va", np.zeros((5, 2))), ("expr", np.eye(8)[[1, 2, 3, 4, 5]]),
                         ("au", np.full((5, 12), 0.7))):
        out = tmp_path / head
        submission.write_videos(out, head, videos, video, frame, values, lengths)
        assert submission.check(out, head, lengths) == []
        assert len((out / "a.txt").read_text().splitlines()) == 1 + 5  # header + every frame
    path = tmp_path / "expr" / "a.txt"
    lines = path.read_text().splitlines()
    lines[3] = "a/00003.jpg,9"
    path.write_text("\n".join(lines[:-1]) + "\n")
    errors = submission.check(tmp_path / "expr", "expr", {**lengths, "c": 2})
    assert f"{path}:4: expected one class in 0..7: 'a/00003.jpg,9'" in errors
    assert f"{path}: 4 frame lines, the video has 5 frames" in errors
    assert f"{tmp_path / 'expr' / 'c.txt'}: missing" in errors
