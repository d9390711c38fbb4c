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
#
# XLA:CPU's loop reduction runs ~2x slower when elementwise producers (BatchNorm, PReLU, the
# attention's backward) are fused into it, and it fuses any operand that the reduction reads at
# a single offset. So every operand of the kernel-gradient reduction is read at several offsets
# or is an array materialised anyway: the forward's padded input (the residual) and the padded
# gradient of the input-gradient conv. Forward + backward of a conv between elementwise ops,
# batch 32: 28x28, 96 channels, 3x3: 15.6 -> 9.2 ms; 56x56x64: 82.7 -> 51.2 ms.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_shift(x, kernel, stride, padding):
    return _shift_conv(_pad(x, padding), kernel, stride)


def _shift_fwd(x, kernel, stride, padding):
    xp = _pad(x, padding)
    return _shift_conv(xp, kernel, stride), (xp, kernel)


def _shift_bwd(stride, padding, residuals, g):
    xp, kernel = residuals
    (kh, kw), (ph, pw) = kernel.shape[:2], padding
    hw = (xp.shape[1] - 2 * ph, xp.shape[2] - 2 * pw)
    # One extra zero row below the gradient when the input has a padding row to pair it with
    # (see _shift_kernel_grad); the input gradient ignores it.
    extra = int(stride == (1, 1) and ph > 0)
    gp = _pad_for_transpose(g, (kh, kw), hw, stride, padding, extra)
    dx = _shift_conv(gp, kernel[::-1, ::-1], (1, 1))
    if extra:
        dx = dx[:, :hw[0]]
    return dx, _shift_kernel_grad(xp, g, gp, kernel.shape, hw, stride, padding, extra)


_depthwise_shift.defvjp(_shift_fwd, _shift_bwd)


def _windows(x, kernel_hw, out_hw, stride):
    """The strided (..., oh, ow, C) window of padded `x` (..., H, W, C) under each kernel tap,
    row-major."""
    lead, (oh, ow), (sh, sw) = x.ndim - 3, out_hw, stride
    for i in range(kernel_hw[0]):
        for j in range(kernel_hw[1]):
            yield lax.slice(x, (0,) * lead + (i, j, 0),
                            (*x.shape[:lead], i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1,
                             x.shape[-1]), (1,) * lead + (sh, sw, 1))


def _pad(x, padding):
    (ph, pw) = padding
    return jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0))) if ph or pw else x


def _out_hw(xp_hw, kernel_hw, stride):
    return tuple((n - k) // s + 1 for n, k, s in zip(xp_hw, kernel_hw, stride, strict=True))


def _shift_conv(xp, kernel, stride):
    """Valid depthwise conv of the (already padded) `xp`."""
    kernel_hw = kernel.shape[:2]
    out_hw = _out_hw(xp.shape[1:3], kernel_hw, stride)
    taps = kernel[:, :, 0, :].reshape(-1, kernel.shape[-1])
    terms = (window * tap for window, tap in zip(_windows(xp, kernel_hw, out_hw, stride), taps,
                                                  strict=True))
    return functools.reduce(jnp.add, terms)


def _pad_for_transpose(g, kernel_hw, x_hw, stride, padding, extra_rows=0):
    """g dilated by the stride and padded by k - 1 - p (the high side also covers rows the
    forward's floor division dropped; negative pads crop), plus `extra_rows` zero rows at the
    bottom: (N, H + kh - 1 + extra_rows, W + kw - 1, C). The input gradient is the stride-1
    conv of this with the flipped kernel."""
    (kh, kw), (sh, sw), (ph, pw) = kernel_hw, stride, padding
    (oh, ow), hp, wp = g.shape[1:3], x_hw[0] + 2 * ph, x_hw[1] + 2 * pw
    return lax.pad(g, jnp.zeros((), g.dtype), [
        (0, 0, 0), (kh - 1 - ph, hp - (oh - 1) * sh - 1 - ph + extra_rows, sh - 1),
        (kw - 1 - pw, wp - (ow - 1) * sw - 1 - pw, sw - 1), (0, 0, 0)])


# XLA:CPU's loop reduction computes its output elements one after another, each reading its
# operands along the whole reduced extent: once the operands outgrow the cache every output
# element re-reads them from memory. Summing per group of images whose operands fit in
# _GROUP_BYTES (a share of a core's L2), then over the groups, made the DDAMFN kernel-gradient
# reductions 1.3-4x faster (one core, batch 32: 28x28, 96 channels, 3x3: 27 -> 6.5 ms; 56x56, 64
# channels: 109 -> 40 ms; all of the train step's: 1,400 -> 410 ms).
_GROUP_BYTES = 1 << 20
# Taps per variadic reduction: with more accumulators per output element (7x7 and 9x9 kernels)
# the loop runs slower than two or three reductions of a share of the taps each (9x9, 256
# channels at stride 2: 81 taps in one 26.6 ms, 27 per reduction 11.1 ms).
_MAX_TAPS = 27


def _group_size(n, per_image_bytes):
    """Images per group: the largest divisor of the batch `n` whose images' operands fit in
    _GROUP_BYTES, leaving at least 8 groups (1 when n < 16).

    The groups stay outside the variadic reduction: with the batch sharded over up to 8 devices
    every device holds whole groups, and the sum over the groups is one all-reduce. A variadic
    reduction over the sharded axis itself became an all-gather per tap."""
    fits = min(max(1, _GROUP_BYTES // max(per_image_bytes, 1)), max(1, n // 8))
    return max(d for d in range(1, n + 1) if n % d == 0 and d <= fits)


def _tap_sums(operands, pairs):
    """Per-channel sums over (N, H, W) of a * b for each pair (a, b) of pairs(*operands).

    The (N, ., ., C) operands are regrouped as (N / s, s, ., ., C), s images per group (see
    _GROUP_BYTES); `pairs` takes windows of those 5-D arrays. The pairs are reduced per group,
    _MAX_TAPS to a variadic reduction, then the groups are summed: returns (pairs, C)."""
    n = operands[0].shape[0]
    s = _group_size(n, sum(a.size // n * a.dtype.itemsize for a in operands))
    products = [a * b for a, b in pairs(*(a.reshape(n // s, s, *a.shape[1:]) for a in operands))]
    zero = jnp.zeros((), products[0].dtype)
    partial = []
    for i in range(0, len(products), _MAX_TAPS):
        chunk = products[i:i + _MAX_TAPS]
        partial += lax.reduce(chunk, [zero] * len(chunk),
                              lambda a, b: [u + v for u, v in zip(a, b, strict=True)], (1, 2, 3))
    return jnp.stack(partial).sum(1)  # one reduction over the groups for all taps


def _shift_kernel_grad(xp, g, gp, kernel_shape, x_hw, stride, padding, extra_rows):
    """d kernel[i, j] = sum over (N, oh, ow) of (xp window (i, j)) * g.

    With `extra_rows` (stride 1 and row padding: the MixConvs' same-size convs) the taps shift
    the padded gradient instead, over the input's grid:
    d kernel[kh-1-i, kw-1-j] = sum of x * (gp window (i, j)), so gp is read at kh*kw offsets.
    x is taken from the padded input with one more row (zero padding, paired with gp's zero
    extra row): a window of exactly the unpadded size would be simplified to x itself, and
    x's producers fused into the reduction. Otherwise (stride > 1: gp is dilated, mostly
    zeros; no row padding: a valid conv such as GDConv, whose output is much smaller than its
    input) the x windows cost fewer multiply-adds.
    """
    kernel_hw, (ph, pw) = kernel_shape[:2], padding
    if not extra_rows:
        out_hw = _out_hw(xp.shape[1:3], kernel_hw, stride)
        sums = _tap_sums((xp, g), lambda xp, g: (
            (window, g) for window in _windows(xp, kernel_hw, out_hw, stride)))
        return sums.reshape(kernel_shape)
    grid = (x_hw[0] + extra_rows, x_hw[1])
    x = lax.slice(xp, (0, ph, pw, 0), (xp.shape[0], ph + grid[0], pw + grid[1], xp.shape[3]))
    sums = _tap_sums((x, gp), lambda x, gp: (
        (x, window) for window in _windows(gp, kernel_hw, grid, (1, 1))))
    return sums.reshape(kernel_shape)[::-1, ::-1]


def h_swish(x: jax.Array) -> jax.Array:
    """x * relu6(x + 3) / 6 (MobileNetV3's hard swish, as the reference defines it)."""
    return x * jax.nn.relu6(x + 3.0) / 6.0


def batch_norm(features: int, rngs: nnx.Rngs) -> BatchNorm:
    return BatchNorm(features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)


class BatchNorm(nnx.BatchNorm):
    """`nnx.BatchNorm` (same variables, statistics and results) whose training-mode forward and
    backward over the last axis are one custom VJP.

    Autodiff of nnx.BatchNorm materialises x - mean in the forward as a residual (a full extra
    pass per layer) and spreads its backward over several fusions. Here the forward keeps only
    the input and the per-channel statistics, and the backward needs two sums over the batch;
    XLA fuses the scale-and-shift into its consumers. Eval mode and other axes are nnx's own.
    """

    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
                 mask: jax.Array | None = None) -> jax.Array:
        running = self.use_running_average if use_running_average is None else use_running_average
        if running or mask is not None or self.axis not in (-1, x.ndim - 1) or \
                self.scale is None or self.bias is None or not self.use_fast_variance or \
                self.axis_name is not None:
            return super().__call__(x, use_running_average, mask=mask)
        dtype = self.dtype or jnp.result_type(x, self.scale[...], self.bias[...])
        y, mean, var = _batch_norm_train(x.astype(dtype), self.scale[...].astype(dtype),
                                         self.bias[...].astype(dtype), self.epsilon)
        m = self.momentum
        self.mean[...] = lax.stop_gradient(m * self.mean[...] + (1 - m) * mean)
        self.var[...] = lax.stop_gradient(m * self.var[...] + (1 - m) * var)
        return y


def _bn_stats(x):
    """Batch mean and biased variance over all but the last axis, as nnx's fast variance."""
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean, mean2 = xf.mean(axes), jnp.square(xf).mean(axes)
    raw = mean2 - jnp.square(mean)
    return mean, jnp.maximum(raw, 0.0), raw > 0


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _batch_norm_train(x, scale, bias, epsilon):
    """(normalised x * scale + bias, batch mean, batch variance)."""
    return _bn_fwd(x, scale, bias, epsilon)[0]


def _bn_fwd(x, scale, bias, epsilon):
    mean, var, positive = _bn_stats(x)
    rstd = lax.rsqrt(var + epsilon)
    # (x - mean) * a + bias as nnx computes it: x * a + (bias - mean * a) cancels digits when
    # |mean| >> std.
    y = (x - mean.astype(x.dtype)) * (scale * rstd).astype(x.dtype) + bias.astype(x.dtype)
    return (y, mean, var), (x, scale, mean, rstd, positive)


def _bn_bwd(epsilon, residuals, cotangents):
    """With xhat = (x - mean) * rstd and M values per channel:
    dbias = sum(gy); dscale = sum(gy * xhat) = rstd * (sum(gy * x) - mean * sum(gy));
    dx = scale * rstd * (gy - dbias / M - xhat * dscale / M), plus the (normally zero)
    cotangents of the returned mean (1 / M) and variance (2 (x - mean) / M).

    sum(gy * x) and sum(gy) are plain products of arrays, which XLA:CPU gives to YNNPACK's
    blocked reduction. sum(gy * (x - mean)) became a loop reduction whose float32 running sum
    made 1-device and 8-device results differ ~100x more (tests/test_train.py)."""
    del epsilon
    x, scale, mean, rstd, positive = residuals
    gy, g_mean, g_var = cotangents
    axes = tuple(range(x.ndim - 1))
    count = x.size // x.shape[-1]
    gyf, xf = gy.astype(mean.dtype), x.astype(mean.dtype)
    sum_gy = gyf.sum(axes)
    dscale = rstd * ((gyf * xf).sum(axes) - mean * sum_gy)
    a = scale * rstd
    c1 = -a * rstd * dscale / count + 2.0 * jnp.where(positive, g_var, 0.0) / count
    c0 = -a * sum_gy / count + g_mean / count
    dx = gyf * a + (xf - mean) * c1 + c0
    return dx.astype(x.dtype), dscale.astype(scale.dtype), sum_gy.astype(scale.dtype)


_batch_norm_train.defvjp(_bn_fwd, _bn_bwd)


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
        # As a 2-D product: autodiff of the N-D `x @ kernel` gave XLA:CPU a kernel gradient that
        # first transposed the whole output gradient (4.7x slower for a 128 -> 1024 conv at
        # 14x14, batch 32); the 2-D one feeds both gradients untransposed.
        kernel = self.kernel[0, 0]
        y = (x.reshape(-1, x.shape[-1]) @ kernel).reshape(*x.shape[:-1], kernel.shape[-1])
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
