r"""Training the ABAW-8 CLIP head from cached image embeddings against end to end through the
frozen tower: frames/s of the same jitted train step (contrastive loss, Adam on the head only)
and the epoch-time ratio, which issue 13 wants at 50x or more.

  python benchmarks/clip_head.py [--size=b16] [--batch=32] [--steps=3]

The tower is a random ViT-B/16 at 224x224 (`convert/clip.py` SIZES; no download); the cache's
rows are its 512-d projected embeddings. Prints `end_to_end:` and `from_cache:` frames/s
(medians of --steps timed steps after a warm-up) and `epoch_speedup:`.
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from abaw_jax import losses
from abaw_jax.convert import clip as convert_clip
from abaw_jax.models import clip

flags.DEFINE_enum("size", "b16", sorted(convert_clip.SIZES), "Tower size.")
flags.DEFINE_integer("batch", 32, "Frames per step (end to end; the cache uses the same).")
flags.DEFINE_integer("steps", 3, "Timed steps of each (after one warm-up).")
FLAGS = flags.FLAGS


def train_step(model: clip.CLIPExpr):
    """A jitted Adam step of the head's parameters (the tower is frozen: no gradient)."""
    head = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("clip")))
    graphdef, trained, rest = nnx.split(model, head, ...)
    tx = optax.adam(1e-3)

    @jax.jit
    def step(trained, opt_state, inputs, labels):
        def loss_fn(trained):
            out = nnx.merge(graphdef, trained, rest)(inputs)["expr"]
            return losses.contrastive(out, labels, jnp.ones_like(labels, bool))

        loss, grads = jax.value_and_grad(loss_fn)(trained)
        updates, opt_state = tx.update(grads, opt_state, trained)
        return optax.apply_updates(trained, updates), opt_state, loss

    state = [trained, tx.init(trained)]

    def run(inputs, labels):
        state[0], state[1], loss = step(state[0], state[1], inputs, labels)
        loss.block_until_ready()

    return run


def _rate(run, inputs, labels, n: int) -> float:
    run(inputs, labels)  # compile
    times = []
    for _ in range(FLAGS.steps):
        start = time.perf_counter()
        run(inputs, labels)
        times.append(time.perf_counter() - start)
    return n / statistics.median(times)


def main(argv):
    del argv
    spec = clip.vision_spec(convert_clip.random_config(FLAGS.size))
    model = clip.CLIPExpr(outputs={"expr": 8}, rngs=nnx.Rngs(0), clip=spec)
    size, n = model.clip.vision.image_size, FLAGS.batch
    rng = np.random.default_rng(0)
    labels = jnp.asarray(rng.integers(0, 8, n))
    images = jnp.asarray(rng.normal(size=(n, size, size, 3)), jnp.float32)
    features = jnp.asarray(rng.normal(size=(n, spec["projection_dim"])), jnp.float32)
    e2e = _rate(train_step(model), {"image": images}, labels, n)
    cached = _rate(train_step(model), {"features": features}, labels, n)
    print(f"{FLAGS.size} {size}x{size}, batch {n}, jax {jax.__version__} "
          f"({jax.default_backend()})")
    print(f"end_to_end: {e2e:.2f} frames/s")
    print(f"from_cache: {cached:.0f} frames/s")
    print(f"epoch_speedup: {cached / e2e:.0f} x")


if __name__ == "__main__":
    app.run(main)
