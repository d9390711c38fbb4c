r"""Depthwise convolution: XLA's grouped conv against shifted multiply-adds, in the full DDAMFN.

  python benchmarks/depthwise.py [--batch=32] [--runs=5] [--impls=xla,shift] [--layers]

For each impl prints the median over --runs (after one warm-up call, compile excluded) of the
jitted eval forward and of the train-mode forward + backward of the full DDAMFN at 112x112, in ms
and images/s, on the current backend. --layers adds forward and forward + backward of the main
depthwise convs of the model alone (each with an elementwise producer and consumer, as in the
model), which is how the per-site choices were made.
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from abaw_jax.models import ddamfn, layers

flags.DEFINE_integer("batch", 32, "Images per batch.")
flags.DEFINE_integer("runs", 5, "Timed calls per measurement (median reported).")
flags.DEFINE_list("impls", ["xla", "shift"], "Depthwise implementations to compare.")
flags.DEFINE_bool("layers", False, "Also time each distinct depthwise conv alone.")
FLAGS = flags.FLAGS

# (H = W of the input, channels, kernel (kh, kw), stride, padding): the largest channel groups of
# each stage's depthwise convs, and the heads' and GDConv's valid convs; --batch inputs each.
SITES = [
    (56, 64, (3, 3), 1, (1, 1)),  # features.1
    (56, 64, (3, 3), 2, (1, 1)), (56, 32, (7, 7), 2, (3, 3)),  # features.2
    (28, 96, (3, 3), 1, (1, 1)), (28, 32, (5, 5), 1, (2, 2)),  # features.3
    (14, 192, (3, 3), 1, (1, 1)), (14, 64, (5, 5), 1, (2, 2)),  # features.5
    (14, 256, (9, 9), 2, (4, 4)),  # features.6, largest group
    (7, 172, (3, 3), 1, (1, 1)), (7, 170, (7, 7), 1, (3, 3)),  # features.7
    (7, 512, (1, 7), 1, (0, 0)),  # heads' Linear_h (Linear_w is its transpose)
    (7, 512, (7, 7), 1, (0, 0)),  # GDConv
]


def _median_ms(fn, *args) -> float:
    jax.block_until_ready(fn(*args))  # warm-up: compile and first run
    times = []
    for _ in range(FLAGS.runs):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _model_fns(model: nnx.Module):
    """Jitted eval forward, and train-mode forward + backward (grads of a cross-entropy, with
    the BatchNorm statistics updated)."""
    model.eval()
    graph_eval, state_eval = nnx.split(model)
    model.train()
    graph_train, state_train = nnx.split(model)

    @jax.jit
    def forward(state, x):
        return nnx.merge(graph_eval, state)({"image": x})["logits"]

    @jax.jit
    def train(state, x):
        model = nnx.merge(graph_train, state)

        def loss(model):
            return -jax.nn.log_softmax(model({"image": x})["logits"])[:, 0].mean()

        return nnx.grad(loss)(model), nnx.state(model, nnx.BatchStat)

    return (forward, state_eval), (train, state_train)


def bench_model(impl: str, state: nnx.State, x: jax.Array) -> None:
    graph, _ = nnx.split(nnx.eval_shape(lambda: ddamfn.ddamfn(depthwise_impl=impl)))
    (forward, state_eval), (train, state_train) = _model_fns(nnx.merge(graph, state))
    for name, ms in (("forward", _median_ms(forward, state_eval, x)),
                     ("train", _median_ms(train, state_train, x))):
        print(f"ddamfn {name:7s} impl={impl:5s} batch={x.shape[0]} {ms:9.1f} ms "
              f"{1e3 * x.shape[0] / ms:8.1f} images/s", flush=True)


def bench_site(impl: str, site, rng: np.random.Generator) -> None:
    size, channels, kernel, stride, padding = site
    x = jnp.asarray(rng.normal(size=(FLAGS.batch, size, size, channels)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(*kernel, 1, channels)), jnp.float32)

    def conv(x, w):
        # An elementwise producer and consumer, as BatchNorm/PReLU and the attention are in the
        # model: XLA fuses them into the conv's loops, which changes what the kernels cost.
        return layers.depthwise_conv(jax.nn.relu(x * 1.5 + 0.1), w, stride, padding, impl=impl)

    fwd = _median_ms(jax.jit(conv), x, w)
    loss = lambda x, w: jnp.square(conv(x, w) - 0.3).sum()  # noqa: E731
    bwd = _median_ms(jax.jit(jax.grad(loss, argnums=(0, 1))), x, w)
    print(f"site {size:3d}x{size:<3d} c={channels:4d} k={kernel} s={stride} impl={impl:5s} "
          f"forward {fwd:8.2f} ms  forward+backward {bwd:8.2f} ms", flush=True)


def main(argv):
    del argv
    print(f"backend={jax.default_backend()} devices={jax.devices()}")
    rng = np.random.default_rng(0)
    state = nnx.state(ddamfn.ddamfn())
    x = jnp.asarray(rng.normal(size=(FLAGS.batch, 112, 112, 3)), jnp.float32)
    for impl in FLAGS.impls:
        bench_model(impl, state, x)
    if FLAGS.layers:
        for site in SITES:
            for impl in FLAGS.impls:
                bench_site(impl, site, rng)


if __name__ == "__main__":
    app.run(main)
