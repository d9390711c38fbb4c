r"""Train-step throughput of the GCSA paper's networks (configs/gcsa/), and GCSA's share of it.

  python benchmarks/gcsa.py [--sizes=tiny,real] [--batches=16,256] [--steps=3]

For each size (tiny: the synthetic default's 64x64 RHCNN; real: `:real`, 112x112) and batch,
times the trainer's jitted train step (forward, coarse-fine loss, backward, SGD with its two
parameter groups, BatchNorm statistics) of the visual model and of the audio-visual model
(RHCNN + MCNN on the 101 x 64 log-mel window) on random inputs, median of --steps after a
warm-up. GCSA's share: the forward and backward of each network's GCSA module alone on the map
that network gives it (`feature_map`), jitted and timed the same way, over the step's time.
(The difference to a step built with gcsa=false was too noisy on the shared machine: -9 % once.)
Prints `gcsa_<visual|av>_<size>_b<batch>: <x> images/s` and
`gcsa_share_<visual|av>_<size>_b<batch>: <x> %`. The batch stays on the device: nothing runs
on the host per step.
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from abaw_jax import config_lib, models, parallel
from abaw_jax import state as state_lib
from abaw_jax.trainers import supervised

flags.DEFINE_list("sizes", ["tiny", "real"], "Network sizes: tiny (synthetic default), real.")
flags.DEFINE_list("batches", ["16", "256"], "Batch sizes.")
flags.DEFINE_integer("steps", 3, "Timed repetitions (after one warm-up).")
FLAGS = flags.FLAGS


def _median_seconds(fn, steps: int) -> float:
    jax.block_until_ready(fn())  # compile + warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _setup(kind: str, size: str, batch: int):
    config = config_lib.gcsa(kind, "real" if size == "real" else "")
    config.batch_size = batch
    mesh = parallel.make_mesh()
    setup = state_lib.make_setup(config, mesh)
    rng = np.random.default_rng(0)
    feed = setup.feed
    host = {"expr": rng.integers(0, 8, batch), "expr_mask": np.ones(batch, bool),
            "image": rng.integers(0, 256, (batch, feed.size, feed.size, 3), np.uint8)}
    if feed.audio:
        host["audio"] = rng.uniform(-100, 20, (batch, feed.audio.window_steps,
                                               feed.audio.n_mels)).astype(np.float32)
    return config, setup, parallel.to_global(host, mesh)


def _step_seconds(config, setup, data) -> float:
    """Median seconds of one train step."""
    state = state_lib.init_state(config, setup)
    step = supervised.train_step(config, setup, state_lib.state_sharding(setup, state))
    holder = [state]

    def one():
        holder[0], stats = step(holder[0], data)
        return stats["loss"]

    return _median_seconds(one, FLAGS.steps)


def _gcsa_seconds(setup, data) -> float:
    """Forward + backward (input and parameter gradients, BatchNorm in train mode) of every
    GCSA module of the model on the maps its networks give it."""
    model = setup.model(state_lib.init_state(setup.config, setup), train=True)
    inputs = models.prepare_inputs(setup.preprocess, data, setup.inputs)
    networks = [model.visual, model.audio] if hasattr(model, "visual") else [model]
    total = 0.0
    for net in networks:
        shape = nnx.eval_shape(lambda n: n.feature_map(inputs), net).shape
        x = jax.random.normal(jax.random.key(0), shape)
        graphdef, params, rest = nnx.split(net.gcsa, nnx.Param, ...)

        @jax.jit
        def grads(params, rest, x, graphdef=graphdef):
            def loss(params, x):
                module = nnx.merge(graphdef, params, jax.tree.map(lambda a: a, rest))
                return jnp.mean(module(x) ** 2)
            return jax.grad(loss, argnums=(0, 1))(params, x)

        total += _median_seconds(lambda g=grads, p=params, r=rest, x=x: g(p, r, x), FLAGS.steps)
    return total


def main(argv):
    del argv
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; malloc "
          f"{parallel.host_allocator()}")
    for size in FLAGS.sizes:
        for batch in map(int, FLAGS.batches):
            for kind in ("visual", "av"):
                config, setup, data = _setup(kind, size, batch)
                step = _step_seconds(config, setup, data)
                gcsa = _gcsa_seconds(setup, data)
                name = f"{kind}_{size}_b{batch}"
                print(f"gcsa_{name}: {batch / step:.1f} images/s ({step * 1000:.0f} ms/step)",
                      flush=True)
                print(f"gcsa_share_{name}: {100 * gcsa / step:.1f} % ({gcsa * 1000:.0f} ms "
                      "forward + backward of GCSA)", flush=True)


if __name__ == "__main__":
    app.run(main)
