"""Shared NHWC blocks (Flax NNX): conv+BN(+PReLU), fast depthwise conv, coordinate attention.

Padding is always explicit and symmetric, as in PyTorch: XLA's 'SAME' pads (0, 1) for a stride-2
3x3 conv on an even size where PyTorch pads (1, 1), which would shift every feature map by a pixel.
Depthwise kernels are stored as (kh, kw, 1, C), the HWIO layout XLA's grouped convolution uses.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

Impl = Literal["shift", "xla"] | None
Pair = int | tuple[int, int]

# PyTorch BatchNorm momentum 0.1 is a running-average decay of 0.9.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def _pair(v: Pair) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def default_depthwise_impl() -> str:
    """'shift' on CPU, where XLA's grouped convolution is 5-50x slower per DDAMFN depthwise conv
    (benchmarks/depthwise.py --layers); 'xla' on accelerators, whose convolutions are fast."""
    return "shift" if jax.default_backend() == "cpu" else "xla"


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: Pair = 1, padding: Pair = 0,
                   impl: Impl = None) -> jax.Array:
    """Depthwise conv of NHWC `x` with a (kh, kw, 1, C) kernel, symmetric zero `padding`.

    impl: 'xla' (grouped `conv_general_dilated`), 'shift' (kh*kw shifted multiply-adds over the
    padded input, strided slices for stride > 1) or None: picked per backend at trace time.
    """
    if kernel.ndim != 4 or kernel.shape[2] != 1 or kernel.shape[3] != x.shape[-1]:
        raise ValueError(f"depthwise kernel must be (kh, kw, 1, {x.shape[-1]}), got {kernel.shape}")
    impl = impl or default_depthwise_impl()
    dtype = jnp.result_type(x, kernel)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    stride, padding = _pair(stride), _pair(padding)
    if impl == "xla":
        return _depthwise_xla(x, kernel, stride, padding)
    if impl == "shift":
        return _depthwise_shift(x, kernel, stride, padding)
    raise ValueError(f"unknown depthwise impl {impl!r}: expected 'shift', 'xla' or None")


def _depthwise_xla(x, kernel, stride, padding):
    return lax.conv_general_dilated(
        x, kernel, window_strides=stride, padding=[(p, p) for p in padding],
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


# The shifted multiply-adds fuse into one loop on CPU, but their autodiff does not: the input
# gradient becomes a chain of pads and the kernel gradient kh*kw separate reductions, each a pass
# over memory. The custom VJP computes the input gradient as one transposed shift-conv and the
# kernel gradient as one variadic reduction (2-4x faster backward). First-order gradients only.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_shift(x, kernel, stride, padding):
    return _shift_conv(x, kernel, stride, padding)


def _shift_fwd(x, kernel, stride, padding):
    return _shift_conv(x, kernel, stride, padding), (x, kernel)


def _shift_bwd(stride, padding, residuals, g):
    x, kernel = residuals
    return (_shift_input_grad(g, kernel, x.shape, stride, padding),
            _shift_kernel_grad(x, g, kernel.shape, stride, padding))


_depthwise_shift.defvjp(_shift_fwd, _shift_bwd)


def _windows(x, kernel_hw, out_hw, stride):
    """The strided (N, oh, ow, C) window of padded `x` under each kernel tap, row-major."""
    n, _, _, c = x.shape
    (oh, ow), (sh, sw) = out_hw, stride
    for i in range(kernel_hw[0]):
        for j in range(kernel_hw[1]):
            yield lax.slice(x, (0, i, j, 0), (n, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, c),
                            (1, sh, sw, 1))


def _pad_and_out_hw(x, kernel_hw, stride, padding):
    (ph, pw), (sh, sw) = padding, stride
    xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0))) if ph or pw else x
    return xp, ((xp.shape[1] - kernel_hw[0]) // sh + 1, (xp.shape[2] - kernel_hw[1]) // sw + 1)


def _shift_conv(x, kernel, stride, padding):
    kernel_hw = kernel.shape[:2]
    xp, out_hw = _pad_and_out_hw(x, kernel_hw, stride, padding)
    taps = kernel[:, :, 0, :].reshape(-1, kernel.shape[-1])
    terms = (window * tap for window, tap in zip(_windows(xp, kernel_hw, out_hw, stride), taps,
                                                  strict=True))
    return functools.reduce(jnp.add, terms)


def _shift_input_grad(g, kernel, x_shape, stride, padding):
    """Transposed conv: dilate g by the stride, pad by k - 1 - p (the high side also covers rows
    the forward's floor division dropped; negative pads crop), stride-1 conv, flipped kernel."""
    (kh, kw), (sh, sw), (ph, pw) = kernel.shape[:2], stride, padding
    (oh, ow), hp, wp = g.shape[1:3], x_shape[1] + 2 * ph, x_shape[2] + 2 * pw
    gp = lax.pad(g, jnp.zeros((), g.dtype), [
        (0, 0, 0), (kh - 1 - ph, hp - (oh - 1) * sh - 1 - ph, sh - 1),
        (kw - 1 - pw, wp - (ow - 1) * sw - 1 - pw, sw - 1), (0, 0, 0)])
    return _shift_conv(gp, kernel[::-1, ::-1], (1, 1), (0, 0))


def _shift_kernel_grad(x, g, kernel_shape, stride, padding):
    """d kernel[i, j] = sum over (N, oh, ow) of window_ij * g, all taps in one reduction."""
    xp, out_hw = _pad_and_out_hw(x, kernel_shape[:2], stride, padding)
    products = [window * g for window in _windows(xp, kernel_shape[:2], out_hw, stride)]
    sums = lax.reduce(products, [jnp.zeros((), g.dtype)] * len(products),
                      lambda a, b: [u + v for u, v in zip(a, b, strict=True)], (0, 1, 2))
    return jnp.stack(sums).reshape(kernel_shape)


def h_swish(x: jax.Array) -> jax.Array:
    """x * relu6(x + 3) / 6 (MobileNetV3's hard swish, as the reference defines it)."""
    return x * jax.nn.relu6(x + 3.0) / 6.0


def batch_norm(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)


class Pointwise(nnx.Module):
    """A 1x1 convolution as a matrix product over the channel axis.

    Same parameters as `nnx.Conv` (kernel (1, 1, in, out), optional bias). Written as a matmul
    because XLA's CPU backend lowered the 1x1 conv's kernel gradient to a convolution running at
    ~2 GFLOP/s, the largest cost of a DDAMFN train step; a dot is fast on every backend.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()  # nnx.Conv's default
        self.kernel = nnx.Param(init(rngs.params(), (1, 1, in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,))) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[0, 0]
        return y if self.bias is None else y + self.bias[...]


def conv(in_features: int, out_features: int, kernel: Pair, *, stride: Pair = 1,
         padding: Pair = 0, use_bias: bool = False, rngs: nnx.Rngs) -> nnx.Module:
    """A dense conv with PyTorch-style symmetric padding (a matmul when 1x1)."""
    if _pair(kernel) == (1, 1) and _pair(stride) == (1, 1) and _pair(padding) == (0, 0):
        return Pointwise(in_features, out_features, use_bias=use_bias, rngs=rngs)
    return nnx.Conv(in_features, out_features, _pair(kernel), strides=_pair(stride),
                    padding=[(p, p) for p in _pair(padding)], use_bias=use_bias, rngs=rngs)


class DepthwiseConv(nnx.Module):
    """Bias-free depthwise conv through `depthwise_conv`; parameter `kernel` (kh, kw, 1, C)."""

    def __init__(self, features: int, kernel: Pair, *, stride: Pair = 1, padding: Pair = 0,
                 impl: Impl = None, rngs: nnx.Rngs):
        kh, kw = _pair(kernel)
        init = nnx.initializers.lecun_normal()  # nnx.Conv's default
        self.kernel = nnx.Param(init(rngs.params(), (kh, kw, 1, features)))
        self.stride, self.padding, self.impl = _pair(stride), _pair(padding), impl

    def __call__(self, x: jax.Array) -> jax.Array:
        return depthwise_conv(x, self.kernel[...], self.stride, self.padding, self.impl)


class PReLU(nnx.Module):
    """PReLU with one slope per channel (PyTorch `PReLU(C)`, init 0.25)."""

    def __init__(self, features: int, init: float = 0.25):
        self.slope = nnx.Param(jnp.full((features,), init, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.where(x >= 0, x, self.slope[...] * x)


class LinearBlock(nnx.Module):
    """conv -> BatchNorm (no activation); `depthwise` needs in_features == out_features."""

    def __init__(self, in_features: int, out_features: int, kernel: Pair = 1, *,
                 stride: Pair = 1, padding: Pair = 0, depthwise: bool = False,
                 impl: Impl = None, rngs: nnx.Rngs):
        if depthwise:
            if in_features != out_features:
                raise ValueError(f"depthwise block needs in == out, got {in_features} -> "
                                 f"{out_features}")
            self.conv = DepthwiseConv(in_features, kernel, stride=stride, padding=padding,
                                      impl=impl, rngs=rngs)
        else:
            self.conv = conv(in_features, out_features, kernel, stride=stride, padding=padding,
                             rngs=rngs)
        self.bn = batch_norm(out_features, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.conv(x))


class ConvBlock(LinearBlock):
    """conv -> BatchNorm -> PReLU."""

    def __init__(self, in_features: int, out_features: int, kernel: Pair = 1, *,
                 stride: Pair = 1, padding: Pair = 0, depthwise: bool = False,
                 impl: Impl = None, rngs: nnx.Rngs):
        super().__init__(in_features, out_features, kernel, stride=stride, padding=padding,
                         depthwise=depthwise, impl=impl, rngs=rngs)
        self.prelu = PReLU(out_features)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.prelu(super().__call__(x))


class MixedDepthwiseConv(nnx.Module):
    """MixConv: split channels into groups, one depthwise k x k conv (padding k // 2) per group."""

    def __init__(self, kernels: Sequence[int], splits: Sequence[int], *, stride: Pair = 1,
                 impl: Impl = None, rngs: nnx.Rngs):
        if len(kernels) != len(splits):
            raise ValueError(f"kernels {list(kernels)} and splits {list(splits)} differ in length")
        self.splits = tuple(splits)
        self.mixed_depthwise_conv = nnx.List([
            DepthwiseConv(c, k, stride=stride, padding=k // 2, impl=impl, rngs=rngs)
            for k, c in zip(kernels, splits, strict=True)])

    def __call__(self, x: jax.Array) -> jax.Array:
        bounds = [sum(self.splits[:i]) for i in range(1, len(self.splits))]
        parts = jnp.split(x, bounds, axis=-1)
        return jnp.concatenate([layer(p) for layer, p in zip(self.mixed_depthwise_conv, parts,
                                                              strict=True)], axis=-1)


class CoordAttCore(nnx.Module):
    """The shared tail of coordinate attention: pooled (n, h, 1, c) and (n, 1, w, c) descriptors
    -> one 1x1 conv + BN + h_swish over both (stacked along H so BatchNorm sees them as one
    batch, as the reference's concatenation does) -> per-direction 1x1 conv + sigmoid."""

    def __init__(self, features: int, mip: int, rngs: nnx.Rngs):
        self.conv1 = conv(features, mip, 1, use_bias=True, rngs=rngs)
        self.bn1 = batch_norm(mip, rngs)
        self.conv2 = conv(mip, features, 1, use_bias=True, rngs=rngs)
        self.conv3 = conv(mip, features, 1, use_bias=True, rngs=rngs)

    def attention(self, x_h: jax.Array, x_w: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(n, h, 1, c), (n, 1, w, c) -> sigmoid maps a_h (n, h, 1, c) and a_w (n, 1, w, c)."""
        h = x_h.shape[1]
        y = jnp.concatenate([x_h, jnp.swapaxes(x_w, 1, 2)], axis=1)
        y = h_swish(self.bn1(self.conv1(y)))
        y_h, y_w = y[:, :h], jnp.swapaxes(y[:, h:], 1, 2)
        return jax.nn.sigmoid(self.conv2(y_h)), jax.nn.sigmoid(self.conv3(y_w))


class CoordAtt(CoordAttCore):
    """Coordinate attention (Hou et al. 2021) with average pooling; returns x * a_w * a_h."""

    def __init__(self, features: int, *, reduction: int = 32, rngs: nnx.Rngs):
        super().__init__(features, max(8, features // reduction), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        a_h, a_w = self.attention(x.mean(axis=2, keepdims=True), x.mean(axis=1, keepdims=True))
        return x * a_w * a_h
