"""JPEG decoding and DDAMFN's training augmentation, in numpy/OpenCV for the data workers.

Images leave here as uint8 RGB (size, size, 3): a quarter of the bytes of float32 to ship to the
device, where the model family's normalisation (`models.Preprocess`) runs inside the jitted
step. `IMAGENET_MEAN` here is random erasing's fill colour.

All geometric augmentations (resize, flip, rotation, scale, translation, crop with padding) are
folded into one affine matrix and one `cv2.warpAffine`: one resampling pass instead of four.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Random erasing fills with 0 *after* normalisation in the reference code: the mean colour here.
_MEAN_PIXEL = tuple(round(255 * m) for m in IMAGENET_MEAN)

cv2.setNumThreads(1)  # parallelism comes from grain's workers; OpenCV's pool would oversubscribe


class ImageDecodeError(ValueError):
    """A record whose image bytes are not a decodable image."""


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """DDAMFN's augmentation (RAF-DB recipe by default; AffectNet: rotate 20, scale 0.8-1,
    translate 0.2, crop_padding 0)."""

    size: int = 112
    flip: float = 0.5  # probability of a horizontal flip
    affine_prob: float = 0.5  # probability of applying rotation/scale/translate/crop at all
    rotate: float = 5.0  # max degrees
    scale: tuple[float, float] = (1.0, 1.0)
    translate: float = 0.0  # max shift as a fraction of the size
    crop_padding: int = 8  # random crop after zero padding by this many pixels (at output size)
    erase_prob: float = 0.5
    erase_scale: tuple[float, float] = (0.02, 0.25)
    erase_ratio: tuple[float, float] = (0.3, 3.3)
    color_jitter: float = 0.0  # max relative change of brightness, contrast and saturation
    # torchvision's RandomResizedCrop before the rest: a box of this fraction of the area and
    # aspect ratio (log-uniform) resized to `size` (MAE pretraining: (0.2, 1)); None: the whole
    # image.
    crop_scale: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, size: int) -> AugmentConfig:
        cfg = {k: v for k, v in dict(cfg or {}).items() if v is not None}
        for key in ("scale", "erase_scale", "erase_ratio", "crop_scale", "crop_ratio"):
            if key in cfg:
                cfg[key] = tuple(cfg[key])
        unknown = set(cfg) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise KeyError(f"unknown augmentation keys {sorted(unknown)}")
        return cls(**{**cfg, "size": size})


def decode(data: bytes, name: str = "image") -> np.ndarray:
    """JPEG/PNG bytes -> uint8 RGB (h, w, 3); `name` goes into the error for a corrupt image."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
    if image is None:
        raise ImageDecodeError(f"{name}: cannot decode the image ({len(data)} bytes)")
    return image


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Evaluation preprocessing: a plain resize to the model's input size."""
    if image.shape[:2] == (size, size):
        return image
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)


def _affine(cfg: AugmentConfig, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """One 2x3 matrix: resize to size, flip, rotate/scale about the centre, translate, crop.

    Built with few small numpy calls: at ~0.15 ms per frame for decode + warp, a naive chain of
    3x3 matrix products was a fifth of the per-frame cost.
    """
    s = cfg.size
    flip, apply = rng.random(2)
    top, left, ch, cw = _crop_box(cfg, h, w, rng) if cfg.crop_scale else (0, 0, h, w)
    ax, ay = s / cw, s / ch
    # Resize of the box mapping pixel centres to pixel centres: x' = (x - left + 0.5) * s / cw
    # - 0.5.
    m = np.array([[ax, 0.0, (0.5 - left) * ax - 0.5], [0.0, ay, (0.5 - top) * ay - 0.5]])
    if flip < cfg.flip:
        m[0] = -m[0]
        m[0, 2] += s - 1
    if apply < cfg.affine_prob:
        t = cfg.translate
        angle, scale, tx, ty = rng.uniform((-cfg.rotate, cfg.scale[0], -t, -t),
                                           (cfg.rotate, cfg.scale[1], t, t))
        # A random crop of size s from the image padded by p on each side is a shift in [-p, p].
        cx, cy = rng.integers(-cfg.crop_padding, cfg.crop_padding + 1, 2)
        r = cv2.getRotationMatrix2D(((s - 1) / 2, (s - 1) / 2), angle, scale)
        m = r[:, :2] @ m
        m[:, 2] += r[:, 2] + (tx * s + cx, ty * s + cy)
    return m


def _crop_box(cfg: AugmentConfig, h: int, w: int, rng: np.random.Generator
              ) -> tuple[int, int, int, int]:
    """torchvision's `RandomResizedCrop.get_params`: (top, left, height, width) of a box of
    area fraction in `crop_scale` and log-uniform aspect in `crop_ratio`; after 10 misses the
    central crop of the aspect clamped to `crop_ratio`."""
    log_ratio = np.log(cfg.crop_ratio)
    for _ in range(10):
        area = h * w * rng.uniform(*cfg.crop_scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    aspect = min(max(w / h, cfg.crop_ratio[0]), cfg.crop_ratio[1])
    cw, ch = (w, round(w / aspect)) if w / h <= aspect else (round(h * aspect), h)
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _erase(image: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> None:
    """torchvision's RandomErasing: one rectangle of random area and aspect, mean-filled."""
    h, w = image.shape[:2]
    for _ in range(10):  # the reference's retry budget for a rectangle that fits
        area = h * w * rng.uniform(*cfg.erase_scale)
        ratio = math.exp(rng.uniform(*np.log(cfg.erase_ratio)))
        eh, ew = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if eh < h and ew < w:
            y, x = rng.integers(0, h - eh + 1), rng.integers(0, w - ew + 1)
            image[y:y + eh, x:x + ew] = _MEAN_PIXEL
            return


def _jitter(image: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    b, c, s = rng.uniform(1 - amount, 1 + amount, 3)
    x = image.astype(np.float32) * b
    x = (x - x.mean()) * c + x.mean()
    grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
    x = (x - grey[..., None]) * s + grey[..., None]
    return np.clip(x, 0, 255).astype(np.uint8)


def augment(image: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Training augmentation of a decoded uint8 RGB image -> uint8 (size, size, 3)."""
    h, w = image.shape[:2]
    out = cv2.warpAffine(image, _affine(cfg, h, w, rng), (cfg.size, cfg.size),
                         flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if cfg.color_jitter > 0:
        out = _jitter(out, cfg.color_jitter, rng)
    if rng.random() < cfg.erase_prob:
        _erase(out, cfg, rng)
    return out
