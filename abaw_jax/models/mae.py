"""Masked autoencoders (He et al., 2022) and the MAE-ViT fine-tuning encoder (Flax NNX).

Two families on one `Spec` of sizes (`SIZES`: "tiny" for tests, "b16", "l16", "h14" as the
reference's `mae_vit_{base,large}_patch16` / `mae_vit_huge_patch14`), both on the shared ViT
blocks of `models/vit.py` (GELU, LayerNorm eps 1e-6, MLP 4x):

- `mae_pretrain` (`MAE`): facebookresearch/mae `models_mae.py`. Patch embedding plus fixed 2-D
  sin-cos position embeddings (`sincos_pos_embed`, a zero row for the class token); per-sample
  random masking by argsort of uniform noise (`random_masking`: mask 1 = removed,
  `ids_restore` unshuffles); the encoder on the class token and the kept patches, then `norm`;
  the decoder (`decoder_embed` to its own width, `mask_token`s in the removed places, its own
  fixed position embeddings, its own depth and heads, `decoder_norm`, `decoder_pred` to
  patch * patch * 3 values); the loss: per-patch MSE against the (optionally per-patch
  normalised) pixels, averaged over the removed patches only (`reconstruction_loss`).
  Outputs loss, pred, mask, latent, ids_restore, as the reference's `forward(imgs, mask_ratio)`
  returns (loss, pred, mask) and its encoder (latent, mask, ids_restore).
- `mae` (`MAEViT`): MAE's fine-tuning model (`models_vit.py`, global pooling): the same
  encoder without masking (learned position embeddings, drop path), the mean of the patch
  tokens, `fc_norm`, one linear layer per task; "embedding" (the normed pooled vector) is what
  the feature cache stores.

Images are NHWC, normalised with ImageNet's mean / std (the reference's transforms), at the
spec's size. Parameter paths mirror the reference keys up to the renames of
`convert/mae.py` (`blocks.N` -> `encoder.layers.N`, `decoder_blocks.N` -> `decoder.layers.N`,
timm's block names -> vit's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from abaw_jax import convert
from abaw_jax.errors import ConfigError
from abaw_jax.models import vit
from abaw_jax.models.family import Family, Inputs, Preprocess, register

FAMILY = "mae"
PRETRAIN = "mae_pretrain"
RESERVED_OUTPUTS = ("embedding", "losses")
PRETRAIN_OUTPUTS = ("loss", "pred", "mask", "latent", "ids_restore")


@dataclasses.dataclass(frozen=True)
class Spec:
    """Every size of an MAE; the defaults are the reference's ViT-B/16 with its 512-wide,
    8-deep, 16-head decoder."""

    image_size: int = 224
    patch: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    decoder_width: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False
    eps: float = 1e-6

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @property
    def keep(self) -> int:
        """Patches the encoder sees: the reference's int(L * (1 - mask_ratio))."""
        return int(self.num_patches * (1 - self.mask_ratio))

    def check(self) -> Spec:
        problems = []
        if self.image_size % self.patch:
            problems.append(f"image_size {self.image_size} is not a multiple of patch "
                            f"{self.patch}")
        for name in ("width", "decoder_width"):
            if getattr(self, name) % 4:  # a sin and a cos per axis
                problems.append(f"{name} {getattr(self, name)} is not a multiple of 4")
        if not 0 <= self.mask_ratio < 1:
            problems.append(f"mask_ratio {self.mask_ratio} is not in [0, 1)")
        if problems:
            raise ConfigError(f"MAE sizes: {'; '.join(problems)}")
        return self


SIZES: dict[str, dict] = {
    "tiny": dict(image_size=32, patch=8, width=32, depth=2, heads=4, decoder_width=16,
                 decoder_depth=1, decoder_heads=2),
    "b16": {},
    "l16": dict(width=1024, depth=24, heads=16),
    "h14": dict(patch=14, width=1280, depth=32, heads=16),
}


def make_spec(size: str = "b16", **fields) -> Spec:
    """The Spec of a named size (`SIZES`), any field overridden by `fields`."""
    if size not in SIZES:
        raise ConfigError(f"MAE size {size!r}; known: {sorted(SIZES)}")
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(Spec)})
    if unknown:
        raise ConfigError(f"unknown MAE fields {unknown}; known: "
                          f"{[f.name for f in dataclasses.fields(Spec)]}")
    return Spec(**{**SIZES[size], **fields}).check()


def sincos_pos_embed(width: int, grid: int) -> np.ndarray:
    """MAE's `get_2d_sincos_pos_embed(width, grid, cls_token=True)`: (1 + grid^2, width) float32.

    Row 0 (the class token) is zero; patch (row i, column j) is at 1 + i * grid + j. Its first
    width / 2 values encode the column and the last width / 2 the row, each as sin(pos * w_k)
    then cos(pos * w_k) for w_k = 10000^(-k / (width / 4)), k < width / 4.
    """
    quarter = width // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")

    def axis(pos: np.ndarray) -> np.ndarray:
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([axis(cols), axis(rows)], axis=1)
    return np.concatenate([np.zeros((1, width)), table]).astype(np.float32)


def random_masking(x: jax.Array, mask_ratio: float, noise: jax.Array
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """MAE's per-sample random masking of tokens x (N, L, D) by uniform noise (N, L): the
    int(L * (1 - mask_ratio)) tokens of least noise are kept, in order of increasing noise.

    Returns (kept (N, keep, D), mask (N, L) float: 0 kept, 1 removed, ids_restore (N, L) int32:
    the place of each token in the shuffled order, which unshuffles it).
    """
    n, length, _ = x.shape
    if noise.shape != (n, length):
        raise ValueError(f"noise {noise.shape}, expected ({n}, {length}): one value per patch")
    keep = int(length * (1 - mask_ratio))
    ids_shuffle = jnp.argsort(noise, axis=1)
    ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
    kept = jnp.take_along_axis(x, ids_shuffle[:, :keep, None], axis=1)
    # The reference gathers [0] * keep + [1] * (L - keep) by ids_restore: a token is removed
    # exactly when its place in the shuffle is keep or later.
    mask = (ids_restore >= keep).astype(jnp.float32)
    return kept, mask, ids_restore


def reconstruction_loss(images: jax.Array, pred: jax.Array, mask: jax.Array, patch: int,
                        norm_pix_loss: bool = False) -> jax.Array:
    """MAE's loss: per-patch mean squared error of pred (N, L, p*p*C) against the patches of
    images (N, H, W, C), averaged over the removed patches (mask 1) only. With norm_pix_loss
    each target patch is normalised by its mean and unbiased variance (+1e-6), as the reference
    (torch's `var` default)."""
    target = vit.patchify(images.astype(jnp.float32), patch)
    if norm_pix_loss:
        mean = target.mean(axis=-1, keepdims=True)
        var = target.var(axis=-1, keepdims=True, ddof=1)
        target = (target - mean) / jnp.sqrt(var + 1e-6)
    per_patch = ((pred.astype(jnp.float32) - target) ** 2).mean(axis=-1)
    return (per_patch * mask).sum() / mask.sum()


def _xavier(module: nnx.Module, rngs: nnx.Rngs) -> None:
    """MAE's `initialize_weights` for the Linear layers: xavier_uniform kernels (biases stay 0).
    q/k/v are thirds of the reference's one `qkv` layer, so drawn with its fans (D, 3D)."""
    init = jax.nn.initializers.xavier_uniform()
    subs = [sub for _, sub in nnx.iter_modules(module)]
    for sub in subs:
        if isinstance(sub, nnx.Linear):
            sub.kernel.set_value(init(rngs.params(), sub.kernel.shape))
    for sub in subs:  # after the Linear layers, whose pass drew q/k/v with fans (D, D)
        if isinstance(sub, vit.Attention):
            width = sub.q_proj.kernel.shape[0]
            qkv = jnp.split(init(rngs.params(), (width, 3 * width)), 3, axis=1)
            for proj, kernel in zip((sub.q_proj, sub.k_proj, sub.v_proj), qkv, strict=True):
                proj.kernel.set_value(kernel)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float) -> jax.Array:
    return jax.random.normal(rngs.params(), shape) * std


class _ViT(nnx.Module):
    """What both families share: patch embedding, class token, position embeddings, encoder."""

    inputs = ("image",)

    def _init_vit(self, spec: Spec, pos_embed: nnx.Variable, drop_path: float, dtype,
                  rngs: nnx.Rngs) -> None:
        self.spec = spec
        self.preprocess = Preprocess(spec.image_size)  # ImageNet mean / std, as MAE's
        self.patch_embed = vit.PatchEmbed(spec.patch, 3, spec.width, use_bias=True, dtype=dtype,
                                          rngs=rngs)
        self.cls_token = nnx.Param(_normal(rngs, (1, 1, spec.width), 0.02))
        self.pos_embed = pos_embed
        self.encoder = vit.Encoder(spec.depth, spec.width, spec.heads,
                                   int(spec.width * spec.mlp_ratio), "gelu", spec.eps,
                                   drop_path=drop_path, dtype=dtype, rngs=rngs)

    def _patch_tokens(self, images: jax.Array) -> jax.Array:
        """(N, patches, width): embedded patches plus their position embeddings."""
        size = self.spec.image_size
        if images.shape[1:] != (size, size, 3):
            raise ValueError(f"images {images.shape[1:]}, the model takes ({size}, {size}, 3)")
        x = self.patch_embed(images)
        return x + self.pos_embed[...][:, 1:].astype(x.dtype)

    def _with_cls(self, x: jax.Array) -> jax.Array:
        cls = (self.cls_token[...] + self.pos_embed[...][:, :1]).astype(x.dtype)
        return jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[-1])), x], axis=1)


class MAE(_ViT):
    """The reference MAE (pretraining): {"image"} and an optional {"noise"} (N, patches)
    uniform in [0, 1) -> loss (scalar), pred (N, patches, patch * patch * 3), mask (N, patches),
    latent (N, 1 + keep, width), ids_restore (N, patches). Without noise the masking draws it
    from `rngs` (stream "masking")."""

    # "frame_mask" (N,): False for examples that count in no loss (a predictor's padding)
    optional_inputs = ("noise", "frame_mask")

    def __init__(self, *, outputs: Mapping[str, int] | None = None, rngs: nnx.Rngs,
                 feature_dim: int = 0, size: str = "b16", dtype=None, **fields):
        if outputs:
            raise ConfigError(f"model {PRETRAIN} reconstructs images: no task outputs "
                              f"({sorted(outputs)}); fine-tune with model {FAMILY!r}")
        if feature_dim:
            raise ConfigError(f"model {PRETRAIN} takes images, not cached features")
        spec = make_spec(size, **fields)
        fixed = nnx.Variable(jnp.asarray(sincos_pos_embed(spec.width, spec.grid)[None]))
        self._init_vit(spec, fixed, 0.0, dtype, rngs)
        self.norm = vit.layer_norm(spec.width, spec.eps, dtype=dtype, rngs=rngs)
        dw = spec.decoder_width
        self.decoder_embed = nnx.Linear(spec.width, dw, dtype=dtype, rngs=rngs)
        self.mask_token = nnx.Param(_normal(rngs, (1, 1, dw), 0.02))
        self.decoder_pos_embed = nnx.Variable(jnp.asarray(sincos_pos_embed(dw, spec.grid)[None]))
        self.decoder = vit.Encoder(spec.decoder_depth, dw, spec.decoder_heads,
                                   int(dw * spec.mlp_ratio), "gelu", spec.eps, dtype=dtype,
                                   rngs=rngs)
        self.decoder_norm = vit.layer_norm(dw, spec.eps, dtype=dtype, rngs=rngs)
        self.decoder_pred = nnx.Linear(dw, spec.patch ** 2 * 3, dtype=dtype, rngs=rngs)
        _xavier(self, rngs)
        kernel = self.patch_embed.kernel  # xavier over the conv's (width, p * p * 3) view
        kernel.set_value(jax.nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3)(
            rngs.params(), kernel.shape))

    def encode(self, images: jax.Array, noise: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The reference's forward_encoder: (latent, mask, ids_restore)."""
        x, mask, ids_restore = random_masking(self._patch_tokens(images), self.spec.mask_ratio,
                                              noise)
        return self.norm(self.encoder(self._with_cls(x))), mask, ids_restore

    def decode(self, latent: jax.Array, ids_restore: jax.Array) -> jax.Array:
        """The reference's forward_decoder: pred (N, patches, patch * patch * 3)."""
        x = self.decoder_embed(latent)
        n, length = ids_restore.shape
        masked = jnp.broadcast_to(self.mask_token[...].astype(x.dtype),
                                  (n, length + 1 - x.shape[1], x.shape[-1]))
        tokens = jnp.take_along_axis(jnp.concatenate([x[:, 1:], masked], axis=1),
                                     ids_restore[..., None], axis=1)
        x = jnp.concatenate([x[:, :1], tokens], axis=1)
        x = self.decoder(x + self.decoder_pos_embed[...].astype(x.dtype))
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def __call__(self, inputs: Inputs, rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
        images = inputs["image"]
        noise = inputs.get("noise")
        if noise is None:
            if rngs is None:
                raise ValueError(f"model {PRETRAIN}: masking needs `noise` (N, patches) in the "
                                 f"inputs or rngs to draw it")
            noise = jax.random.uniform(rngs.masking(), (images.shape[0], self.spec.num_patches))
        latent, mask, ids_restore = self.encode(images, noise)
        pred = self.decode(latent, ids_restore)
        counted = mask if "frame_mask" not in inputs else mask * inputs["frame_mask"][:, None]
        loss = reconstruction_loss(images, pred, counted, self.spec.patch,
                                   self.spec.norm_pix_loss)
        return {"loss": loss, "pred": pred, "mask": mask, "latent": latent,
                "ids_restore": ids_restore}


class MAEViT(_ViT):
    """MAE's fine-tuning encoder (`models_vit.VisionTransformer(global_pool=True)`): every token
    through the encoder (drop path rising to `drop_path`), the mean of the patch tokens,
    `fc_norm`; "embedding" (N, width) and one linear layer per task output. From cached
    {"features"} (the embedding) only the task layers run.

    Initialised as the reference when trained from scratch: normal(0.02) class token, position
    embeddings and Linear kernels (timm's trunc_normal_(std=.02) cuts at +-2, i.e. 100 std, so
    it is a plain normal), task layers normal(2e-5) (main_finetune.py's head)."""

    def __init__(self, *, outputs: Mapping[str, int], rngs: nnx.Rngs, feature_dim: int = 0,
                 size: str = "b16", drop_path: float = 0.1, dtype=None, **fields):
        clash = sorted(set(outputs) & set(RESERVED_OUTPUTS))
        if clash:
            raise ConfigError(f"output names {clash} are reserved ({RESERVED_OUTPUTS})")
        spec = make_spec(size, **fields)
        if feature_dim and feature_dim != spec.width:
            raise ConfigError(f"cached features of width {feature_dim} cannot replace this "
                              f"MAE-ViT's {spec.width}-wide embedding")
        pos_embed = nnx.Param(_normal(rngs, (1, spec.num_patches + 1, spec.width), 0.02))
        self._init_vit(spec, pos_embed, drop_path, dtype, rngs)
        for _, sub in nnx.iter_modules(self.encoder):
            if isinstance(sub, nnx.Linear):
                sub.kernel.set_value(_normal(rngs, sub.kernel.shape, 0.02))
        self.fc_norm = vit.layer_norm(spec.width, spec.eps, dtype=dtype, rngs=rngs)
        self.outputs = dict(outputs)
        head = nnx.initializers.normal(2e-5)
        self.tasks = nnx.Dict({name: nnx.Linear(spec.width, n, kernel_init=head, dtype=dtype,
                                                rngs=rngs) for name, n in outputs.items()})

    @property
    def embed_dim(self) -> int:
        return self.spec.width

    def __call__(self, inputs: Inputs, rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
        if "features" in inputs:
            embedding = inputs["features"]
        else:
            x = self.encoder(self._with_cls(self._patch_tokens(inputs["image"])), rngs=rngs)
            embedding = self.fc_norm(x[:, 1:].mean(axis=1))
        return {"embedding": embedding,
                **{name: self.tasks[name](embedding) for name in self.outputs}}


# What the fine-tuning encoder takes of a pretraining run: the decoder side (`norm`, the
# decoder, `mask_token`, `decoder_pos_embed`) is dropped, as MAE's main_finetune.py drops it.
_ENCODER_VARIABLES = ("patch_embed.", "cls_token", "pos_embed", "encoder.")


def load_run(model: MAEViT, source: str, variables: Mapping[str, np.ndarray], where: str
             ) -> list[str]:
    """init_from a training workdir: the encoder of a `mae_pretrain` run (its fixed sin-cos
    position embeddings start the learned ones; `fc_norm` and the task layers keep their fresh
    initialisation), or every variable of a `mae` run (task layers where they match). Returns
    the task layers loaded."""
    if source == PRETRAIN:
        kept = {k: v for k, v in variables.items() if k.startswith(_ENCODER_VARIABLES)}
        return convert.load_state(model, kept, where, absent=("fc_norm.",))
    if source == FAMILY:
        return convert.load_state(model, variables, where)
    raise ConfigError(f"init_from={where}: a run of model {source!r}; model {FAMILY!r} starts "
                      f"from a run of {PRETRAIN!r} or {FAMILY!r}")


def load_weights(model: MAEViT, path) -> list[str]:
    """init_from a converted folder: an `mae` one as it is, the encoder of an `mae_pretrain`
    one as of a pretraining run (`load_run`)."""
    if convert.read_meta(path, FAMILY).get("model") == PRETRAIN:
        return load_run(model, PRETRAIN, convert.read_state(path), str(path))
    return convert.load_into(model, path)


def embed(model: MAEViT, inputs: Inputs) -> jax.Array:
    """A frame's pooled, normed MAE-ViT embedding: what the feature cache stores."""
    return model(inputs)["embedding"]


def _preprocess(model: _ViT) -> Preprocess:
    return model.preprocess


register(Family(FAMILY, lambda **kw: MAEViT(**kw), preprocess=_preprocess, embed=embed,
                backbone=(r"^(patch_embed/|cls_token$|pos_embed$|encoder/|fc_norm/)",),
                load_weights=load_weights, load_run=load_run))
register(Family(PRETRAIN, lambda **kw: MAE(**kw), preprocess=_preprocess,
                returns=PRETRAIN_OUTPUTS, labels=False))
