r"""MAE pretraining throughput, ours against the PyTorch reference MAE in the same run, and the
encoder's FLOPs per image with and without masking.

  python benchmarks/mae.py [--size=b16] [--batch=8] [--steps=3] [--mask_ratio=0.75]

Both are the reference MAE of --size (ViT-B/16 with its 512-wide, 8-block decoder by default)
at its image size, random weights, training on a random batch: forward with masking, the
masked-patch MSE, backward and an AdamW step (betas 0.9 / 0.95, weight decay 0.05, the
reference recipe; decay on every parameter here, which costs the same). Ours is
`models.mae.MAE`, jitted, the noise drawn inside the step; PyTorch's is tests/reference/mae.py
(the structure of facebookresearch/mae's `models_mae.py`, timm's blocks inlined). Each is timed
--steps times after one warm-up, interleaved so that this CPU's drift moves both alike; prints
`flax_mae_pretrain:` and `torch_mae_pretrain:` images/s (medians) and their ratio.

The FLOPs come from XLA's cost analysis of our jitted `MAE.encode` (patch embedding, masking,
the encoder on the class token and the kept patches, norm) on one image at --mask_ratio and
at 0 (every patch): `encoder_flops_masked:`, `encoder_flops_full:` GFLOP/image and their ratio.
"""

import importlib.util
import statistics
import timeit
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from absl import app, flags
from flax import nnx

from abaw_jax import parallel
from abaw_jax.models import mae

# The reference lives with the tests (test-only, not part of abaw_jax): load that one file by
# path, so that neither `tests` on sys.path nor an import of a test module is needed.
_REF_PATH = Path(__file__).resolve().parents[1] / "tests/reference/mae.py"
_spec = importlib.util.spec_from_file_location("mae_reference", _REF_PATH)
ref_mae = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref_mae)

flags.DEFINE_enum("size", "b16", ["b16", "l16"], "Reference MAE size.")
flags.DEFINE_integer("batch", 8, "Images per train step.")
flags.DEFINE_integer("steps", 3, "Timed repetitions of each (after one warm-up).")
flags.DEFINE_float("mask_ratio", 0.75, "Fraction of patches removed.")
FLAGS = flags.FLAGS
LR, BETAS, WEIGHT_DECAY = 1.5e-4, (0.9, 0.95), 0.05


def flax_step(model: mae.MAE):
    """images -> loss of one jitted AdamW step on `model`'s parameters (state kept inside)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], weight_decay=WEIGHT_DECAY)
    state = {"params": params, "opt": tx.init(params), "key": jax.random.key(0)}

    @jax.jit
    def step(params, opt_state, key, images):
        key, masking = jax.random.split(key)

        def loss_fn(params):
            out = nnx.merge(graphdef, params, rest)({"image": images}, rngs=nnx.Rngs(masking))
            return out["loss"]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, key, loss

    def run(images):
        state["params"], state["opt"], state["key"], loss = step(
            state["params"], state["opt"], state["key"], images)
        return float(loss)

    return run


def torch_step(size: str, image_size: int, mask_ratio: float):
    torch.manual_seed(0)
    model = ref_mae.MaskedAutoencoderViT(img_size=image_size, **ref_mae.SIZES[size],
                                         **ref_mae.DECODER).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)

    def run(images):
        loss, _, _ = model(images, mask_ratio)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return run


def encoder_gflops(size: str, mask_ratio: float) -> float:
    """XLA's FLOP count of MAE.encode on one image, in GFLOP (shapes only: nothing runs)."""
    model = nnx.eval_shape(lambda: mae.MAE(rngs=nnx.Rngs(0), size=size, mask_ratio=mask_ratio))
    graphdef, state = nnx.split(model)
    spec = model.spec
    images = jax.ShapeDtypeStruct((1, spec.image_size, spec.image_size, 3), jnp.float32)
    noise = jax.ShapeDtypeStruct((1, spec.num_patches), jnp.float32)

    def encode(state, images, noise):
        return nnx.merge(graphdef, state).encode(images, noise)[0]

    cost = jax.jit(encode).lower(state, images, noise).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"] / 1e9


def main(argv):
    del argv
    model = mae.MAE(rngs=nnx.Rngs(0), size=FLAGS.size, mask_ratio=FLAGS.mask_ratio)
    size = model.spec.image_size
    masked, full = encoder_gflops(FLAGS.size, FLAGS.mask_ratio), encoder_gflops(FLAGS.size, 0)
    images = np.random.default_rng(0).normal(size=(FLAGS.batch, size, size, 3)).astype(
        np.float32)
    ours = flax_step(model)
    theirs = torch_step(FLAGS.size, size, FLAGS.mask_ratio)
    x_ours, x_theirs = jnp.asarray(images), torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    compile_s = timeit.timeit(lambda: ours(x_ours), number=1)  # warm-up: compile and first step
    timeit.timeit(lambda: theirs(x_theirs), number=1)
    times = {"flax": [], "torch": []}
    for _ in range(FLAGS.steps):
        times["flax"].append(timeit.timeit(lambda: ours(x_ours), number=1))
        times["torch"].append(timeit.timeit(lambda: theirs(x_theirs), number=1))
    rate = {k: FLAGS.batch / statistics.median(v) for k, v in times.items()}
    print(f"{FLAGS.size} {size}x{size}, mask ratio {FLAGS.mask_ratio}, batch {FLAGS.batch}, "
          f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), malloc {parallel.host_allocator()}; first "
          f"flax step (compile + run) {compile_s:.1f} s")
    print(f"flax_mae_pretrain: {rate['flax']:.2f} images/s")
    print(f"torch_mae_pretrain: {rate['torch']:.2f} images/s")
    print(f"flax_over_torch: {rate['flax'] / rate['torch']:.2f} x")
    print(f"encoder_flops_masked: {masked:.2f} GFLOP/image")
    print(f"encoder_flops_full: {full:.2f} GFLOP/image")
    print(f"encoder_flops_full_over_masked: {full / masked:.2f} x")


if __name__ == "__main__":
    app.run(main)
