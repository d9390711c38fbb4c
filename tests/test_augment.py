"""Decoding and DDAMFN's training augmentation."""

import cv2
import numpy as np
import pytest

from abaw_jax.data import augment


def _image(h=128, w=128):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 2 % 256, y * 2 % 256, (x + y) % 256], -1).astype(np.uint8)


def test_decode_returns_rgb():
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0] = 250  # red
    data = cv2.imencode(".png", rgb[..., ::-1])[1].tobytes()  # OpenCV writes BGR
    np.testing.assert_array_equal(augment.decode(data), rgb)
    with pytest.raises(augment.ImageDecodeError, match=r"vid/00001\.jpg: cannot decode"):
        augment.decode(b"\xff\xd8garbage", "vid/00001.jpg")


def test_no_augmentation_is_a_resize():
    cfg = augment.AugmentConfig(size=64, flip=0, affine_prob=0, erase_prob=0)
    img = _image()
    out = augment.augment(img, cfg, np.random.default_rng(0))
    ref = augment.resize(img, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - ref.astype(int)).mean() < 2.0


def test_flip_mirrors():
    cfg = augment.AugmentConfig(size=128, flip=1.0, affine_prob=0, erase_prob=0)
    img = _image()
    np.testing.assert_array_equal(augment.augment(img, cfg, np.random.default_rng(0)),
                                  img[:, ::-1])


def test_crop_padding_shifts_by_whole_pixels():
    cfg = augment.AugmentConfig(size=128, flip=0, affine_prob=1, rotate=0, crop_padding=8,
                                erase_prob=0)
    img = _image()
    out = augment.augment(img, cfg, np.random.default_rng(3))
    shifts = [(dy, dx) for dy in range(-8, 9) for dx in range(-8, 9)
              if np.array_equal(out[16:-16, 16:-16], img[16 - dy:112 - dy, 16 - dx:112 - dx])]
    assert len(shifts) == 1 and shifts[0] != (0, 0)


def test_random_erasing_fills_the_mean_colour():
    cfg = augment.AugmentConfig(size=64, flip=0, affine_prob=0, erase_prob=1.0,
                                erase_scale=(0.1, 0.1))
    img = np.zeros((64, 64, 3), np.uint8)
    out = augment.augment(img, cfg, np.random.default_rng(0))
    erased = np.all(out == augment._MEAN_PIXEL, axis=-1)
    assert abs(erased.sum() - 0.1 * 64 * 64) < 0.05 * 64 * 64


def test_same_rng_same_output_and_config_keys():
    cfg = augment.AugmentConfig.from_config({"rotate": 20, "scale": [0.8, 1.0],
                                             "color_jitter": 0.3}, size=112)
    img = _image(100, 90)
    a = augment.augment(img, cfg, np.random.default_rng(5))
    b = augment.augment(img, cfg, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (112, 112, 3)
    with pytest.raises(KeyError, match="rotation"):
        augment.AugmentConfig.from_config({"rotation": 5}, size=112)


def test_random_resized_crop_takes_a_box_of_the_drawn_area():
    # A quarter of the area at aspect 1 is a 64x64 box; resized to 64 it is that box exactly,
    # and the planted pixels (red = 2x, green = 2y) say where it was.
    cfg = augment.AugmentConfig(size=64, flip=0, affine_prob=0, erase_prob=0,
                                crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0))
    img = _image()
    corners = set()
    for seed in range(6):
        out = augment.augment(img, cfg, np.random.default_rng(seed))
        left, top = int(out[0, 0, 0]) // 2, int(out[0, 0, 1]) // 2
        np.testing.assert_array_equal(out, img[top:top + 64, left:left + 64])
        corners.add((top, left))
    assert len(corners) > 3  # the box moves


def test_random_resized_crop_falls_back_to_the_central_box():
    # No box of 90-100 % of the area has aspect 4 inside a square: torchvision's fallback, the
    # central full-width box of height 128 / 4 = 32 (rows 48-79), resized to 128x128.
    cfg = augment.AugmentConfig(size=128, flip=0, affine_prob=0, erase_prob=0,
                                crop_scale=(0.9, 1.0), crop_ratio=(4.0, 5.0))
    out = augment.augment(_image(), cfg, np.random.default_rng(0))
    rows = out[..., 1].astype(int) // 2
    assert rows.min() >= 47 and rows.max() <= 80 and out[..., 0].max() >= 250
