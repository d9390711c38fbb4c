r"""Checkpoint save and restore times of a model's train state on the current devices.

  python benchmarks/checkpoint.py [--model=ddamfn] [--saves=3]
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/checkpoint.py

Saves the trainer's state (parameters, BatchNorm statistics, Adam moments) with the trainer's
own `Checkpoints` (Orbax, asynchronous) and prints, per save, the blocking part (the training
loop is stopped) and the total (until the files are committed), then the time to restore the
newest checkpoint onto the current devices, as `resume:` (what a restarted run pays before its
first step, compilation aside). Both include the CRC32C checksums of every array of the state
(the save computes them from the values it is given, the restore from the values it read):
`checksums:` times them alone.
"""

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
from absl import app, flags

from abaw_jax import checkpoint, config_lib, parallel
from abaw_jax import state as state_lib

flags.DEFINE_string("model", "ddamfn", "Registered model name.")
flags.DEFINE_integer("saves", 3, "Timed saves (the first one also pays one-time setup).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    config = config_lib.experiment("va")
    config.model.name = FLAGS.model
    setup = state_lib.make_setup(config, parallel.make_mesh())
    state = state_lib.init_state(config, setup)
    n = sum(x.size for x in jax.tree.leaves(state))
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; model {FLAGS.model}; "
          f"state {n / 1e6:.2f}M values, {nbytes / 2**20:.1f} MiB")
    directory = Path(tempfile.mkdtemp(prefix="bench_checkpoint_"))
    try:
        ckpt = checkpoint.Checkpoints(directory, keep=2)
        blocking, total = [], []
        for step in range(1, FLAGS.saves + 1):
            t0 = time.perf_counter()
            ckpt.save(step, state)
            t1 = time.perf_counter()
            ckpt.wait()
            blocking.append(t1 - t0)
            total.append(time.perf_counter() - t0)
            print(f"save {step}: blocking {blocking[-1] * 1000:.0f} ms, "
                  f"total {total[-1] * 1000:.0f} ms")
        print(f"save (median): blocking {statistics.median(blocking) * 1000:.0f} ms, total "
              f"{statistics.median(total) * 1000:.0f} ms")
        crc = []
        for _ in range(FLAGS.saves):
            t0 = time.perf_counter()
            checkpoint._array_crcs(state)  # noqa: SLF001 - its part of a save and a restore
            crc.append(time.perf_counter() - t0)
        print(f"checksums (median): {statistics.median(crc) * 1000:.0f} ms, in each save's "
              "blocking part and in the restore")
        ckpt.close()
        abstract = state_lib.abstract_state(config, setup)
        t0 = time.perf_counter()
        ckpt = checkpoint.Checkpoints(directory, read_only=True)
        step, restored = ckpt.restore_latest(abstract)
        jax.block_until_ready(restored)
        print(f"resume: {(time.perf_counter() - t0) * 1000:.0f} ms (restore of step {step})")
        ckpt.close()
    finally:
        shutil.rmtree(directory)


if __name__ == "__main__":
    app.run(main)
