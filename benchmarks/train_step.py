r"""Train-step and inference throughput of a model on the current devices.

  python benchmarks/train_step.py --model=ddamfn --batch=32 [--task=va] [--steps=5]
      [--depthwise=auto|shift|xla] [--allreduce]
  launch/local.sh 2 python benchmarks/train_step.py ...   # several processes (see scaling.py)

Times the trainer's own jitted, donated train step (forward, loss, backward, Adam update,
BatchNorm statistics) and the eval-mode forward on random uint8 images, after compilation
(median of --steps runs). Prints `train_step: <x> images/s` and `inference: <x> images/s`.
On CPU preload tcmalloc (`LD_PRELOAD=libtcmalloc_minimal.so.4 python benchmarks/...`): glibc
malloc maps XLA's temporaries afresh at every step (README, "Speed on CPU"); the first line
names the malloc. Reference on the project's 2-core CPU: the issue quotes the official PyTorch
DDAMFN at ~5.5 images/s training and ~30-36 inference at batch 32; benchmarks/torch_ddamfn.py
times the parity tests' PyTorch DDAMFN on the same machine. `--allreduce` also times an
all-reduce (sum over the devices of all processes) of a gradient-sized float32 vector, printed
as `allreduce: <ms>`.
Under several processes `--batch` is the global batch and process 0 prints.
"""

import statistics
import time

import jax
import numpy as np
from absl import app, flags

from abaw_jax import config_lib, parallel
from abaw_jax import state as state_lib
from abaw_jax.trainers import supervised

flags.DEFINE_string("model", "ddamfn", "Registered model name.")
flags.DEFINE_string("task", "va", "Task (sets the output layers and the loss).")
flags.DEFINE_integer("batch", 32, "Global batch size.")
flags.DEFINE_integer("steps", 5, "Timed repetitions (after one warm-up).")
flags.DEFINE_enum("depthwise", "auto", ["auto", "shift", "xla"], "Depthwise conv kernel.")
flags.DEFINE_bool("allreduce", False, "Also time an all-reduce of the parameters' size.")
FLAGS = flags.FLAGS


def _median_seconds(fn, steps: int) -> float:
    jax.block_until_ready(fn())  # compile + warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _allreduce_seconds(mesh, size: int, steps: int) -> float:
    """A (devices, size) array sharded over "data", summed over the devices: one all-reduce."""
    local = np.ones((jax.local_device_count(), size), np.float32)
    x = parallel.to_global({"x": local}, mesh)["x"]
    total = jax.jit(lambda a: a.sum(0), out_shardings=parallel.replicated(mesh))
    return _median_seconds(lambda: total(x), steps)


def main(argv):
    del argv
    parallel.initialize()
    config = config_lib.experiment(FLAGS.task)
    config.model.name = FLAGS.model
    if FLAGS.depthwise != "auto":
        config.model.depthwise_impl = FLAGS.depthwise
    config.batch_size = FLAGS.batch
    mesh = parallel.make_mesh()
    setup = state_lib.make_setup(config, mesh)
    state = state_lib.init_state(config, setup)
    step = supervised.train_step(config, setup, state_lib.state_sharding(setup, state))
    rng = np.random.default_rng(jax.process_index())
    n = parallel.check_batch_size(FLAGS.batch, mesh)  # this process's rows
    batch = parallel.to_global({
        "image": rng.integers(0, 256, (n, setup.feed.size, setup.feed.size, 3), np.uint8),
        "va": rng.uniform(-1, 1, (n, 2)).astype(np.float32), "expr": rng.integers(0, 8, n),
        "au": rng.integers(0, 2, (n, 12)), "va_mask": np.ones(n, bool),
        "expr_mask": np.ones(n, bool), "au_mask": np.ones(n, bool)}, mesh)
    holder = [state]

    def one_step():
        holder[0], stats = step(holder[0], batch)
        return stats["loss"]

    predict = state_lib.predict_fn(setup)
    t_train = _median_seconds(one_step, FLAGS.steps)
    t_infer = _median_seconds(lambda: state_lib.bind(predict, holder[0])(
        {"image": batch["image"]}), FLAGS.steps)
    n = FLAGS.batch
    params = sum(x.size for x in jax.tree.leaves(holder[0].params))
    if FLAGS.allreduce:
        t_reduce = _allreduce_seconds(mesh, params, FLAGS.steps)
        t_small = _allreduce_seconds(mesh, 256, FLAGS.steps)
        hlo = step.lower(holder[0], batch).compile().as_text()
        collectives = hlo.count(" all-reduce(") + hlo.count(" all-reduce-start(")
    if jax.process_index() > 0:
        return
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform} in "
          f"{jax.process_count()} process(es); model {FLAGS.model} ({params / 1e6:.2f}M "
          f"parameters), batch {n}, depthwise {FLAGS.depthwise}, "
          f"malloc {parallel.host_allocator()}")
    print(f"train_step: {n / t_train:.1f} images/s ({t_train * 1000:.0f} ms/step)")
    print(f"inference: {n / t_infer:.1f} images/s ({t_infer * 1000:.0f} ms/batch)")
    if FLAGS.allreduce:
        print(f"allreduce: {t_reduce * 1000:.1f} ms ({params / 1e6:.2f}M float32 values); "
              f"{t_small * 1000:.2f} ms (256 values); the train step has {collectives} "
              f"all-reduces")


if __name__ == "__main__":
    app.run(main)
