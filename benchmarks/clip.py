r"""CLIP image-tower inference: our Flax `CLIPVision` against transformers' PyTorch
`CLIPVisionModelWithProjection`, same config, same run.

  python benchmarks/clip.py [--size=b16] [--batch=32] [--steps=3] [--dtype=float32]

Both towers are ViT-B/16 at 224x224 by default (`convert/clip.py` SIZES; random weights, no
download) and compute the projected image embedding of a random batch. Ours is jitted; PyTorch
runs under `torch.inference_mode()` with its default attention (SDPA). Each is timed --steps
times after one warm-up, the two interleaved so that this CPU's drift moves both alike; prints
`flax_clip_vision:` and `torch_clip_vision:` lines in images/s (medians) and their ratio.
"""

import statistics
import timeit

import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl import app, flags
from flax import nnx
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from abaw_jax import parallel
from abaw_jax.convert import clip as convert_clip
from abaw_jax.models import clip

flags.DEFINE_enum("size", "b16", sorted(convert_clip.SIZES), "Tower size.")
flags.DEFINE_integer("batch", 32, "Images per batch.")
flags.DEFINE_integer("steps", 3, "Timed repetitions of each (after one warm-up).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Our compute dtype.")
FLAGS = flags.FLAGS


def flax_tower(config: dict, dtype):
    """Jitted images -> image_embeds of a random CLIPVision (numpy init: no compile per shape)."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: clip.CLIPVision(
        config["vision_config"], config["projection_dim"], dtype=dtype, rngs=nnx.Rngs(0))))
    state = convert_clip.random_state(nnx.to_pure_dict(params), 0, 0.0)
    nnx.replace_by_pure_dict(params, jax.tree.map(jnp.asarray, state))

    @jax.jit
    def embed(params, images):
        return nnx.merge(graphdef, params)(images)["image_embeds"]

    return lambda images: embed(params, images).block_until_ready()


def torch_tower(config: dict):
    settings = {k: v for k, v in config["vision_config"].items()
                if k not in ("model_type", "transformers_version")}
    vision = CLIPVisionConfig(**{**settings, "projection_dim": config["projection_dim"]})
    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(vision).eval()

    def embed(images):
        with torch.inference_mode():
            return model(pixel_values=images).image_embeds

    return embed


def main(argv):
    del argv
    config = convert_clip.random_config(FLAGS.size)
    size = config["vision_config"]["image_size"]
    images = np.random.default_rng(0).normal(size=(FLAGS.batch, size, size, 3)).astype(
        np.float32)
    ours, theirs = flax_tower(config, jnp.dtype(FLAGS.dtype)), torch_tower(config)
    x_ours, x_theirs = jnp.asarray(images), torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    compile_s = timeit.timeit(lambda: ours(x_ours), number=1)  # warm-up: compile and first run
    timeit.timeit(lambda: theirs(x_theirs), number=1)
    times = {"flax": [], "torch": []}
    for _ in range(FLAGS.steps):
        times["flax"].append(timeit.timeit(lambda: ours(x_ours), number=1))
        times["torch"].append(timeit.timeit(lambda: theirs(x_theirs), number=1))
    n = FLAGS.batch
    rate = {k: n / statistics.median(v) for k, v in times.items()}
    print(f"{FLAGS.size} {size}x{size}, batch {n}, jax {jax.__version__} ({jax.default_backend()}, "
          f"{FLAGS.dtype}), torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"malloc {parallel.host_allocator()}; first flax call (compile + run) {compile_s:.1f} s")
    print(f"flax_clip_vision: {rate['flax']:.2f} images/s")
    print(f"torch_clip_vision: {rate['torch']:.2f} images/s")
    print(f"flax_over_torch: {rate['flax'] / rate['torch']:.2f} x")


if __name__ == "__main__":
    app.run(main)
