r"""Cost of going multi-process at the same global batch: 1 process x D devices against
P processes x D/P devices on this machine (launch/local.sh, loopback, gloo collectives).

  python benchmarks/scaling.py [--model=ddamfn] [--batch=32] [--devices=2] [--processes=2]

Runs benchmarks/train_step.py --allreduce in both layouts and prints the train step time, the
all-reduce of a parameter-sized gradient, and the difference. Both layouts have the same number
of devices (one per core here), so the difference is what the cross-process collectives cost.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

from absl import app, flags

ROOT = Path(__file__).parents[1]
flags.DEFINE_string("model", "ddamfn", "Registered model name.")
flags.DEFINE_integer("batch", 32, "Global batch size.")
flags.DEFINE_integer("devices", 2, "Devices in total (fake CPU devices on a CPU machine).")
flags.DEFINE_integer("processes", 2, "Processes of the multi-process layout.")
flags.DEFINE_integer("steps", 5, "Timed repetitions.")
FLAGS = flags.FLAGS


def _run(processes: int, devices_per_process: int) -> dict[str, float]:
    cmd = [str(ROOT / "launch" / "local.sh"), str(processes), sys.executable,
           str(ROOT / "benchmarks" / "train_step.py"), f"--model={FLAGS.model}",
           f"--batch={FLAGS.batch}", f"--steps={FLAGS.steps}", "--allreduce"]
    env = {**os.environ, "LOCAL_DEVICES": str(devices_per_process)}
    env.pop("XLA_FLAGS", None)  # local.sh sets the device count
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    got = {}
    for key in ("train_step", "inference"):
        got[key] = float(re.search(rf"{key}: [0-9.]+ images/s \(([0-9.]+) ms", out).group(1))
    m = re.search(r"allreduce: ([0-9.]+) ms .*; ([0-9.]+) ms .* has (\d+) all-reduces", out)
    got["allreduce"], got["small"], got["count"] = float(m[1]), float(m[2]), int(m[3])
    return got


def main(argv):
    del argv
    if FLAGS.devices % FLAGS.processes:
        raise app.UsageError("--devices must be a multiple of --processes")
    one = _run(1, FLAGS.devices)
    many = _run(FLAGS.processes, FLAGS.devices // FLAGS.processes)
    print(f"model {FLAGS.model}, global batch {FLAGS.batch}, {FLAGS.devices} devices")
    print(f"{'layout':<24}{'train step ms':>14}{'inference ms':>14}"
          f"{'all-reduce ms (params)':>24}{'(256 values)':>14}")
    for name, r in ((f"1 process x {FLAGS.devices}", one),
                    (f"{FLAGS.processes} processes x {FLAGS.devices // FLAGS.processes}", many)):
        print(f"{name:<24}{r['train_step']:>14.0f}{r['inference']:>14.0f}"
              f"{r['allreduce']:>24.1f}{r['small']:>14.2f}")
    print(f"all-reduces per train step: {many['count']} (gradients and BatchNorm batch "
          f"statistics, which are over the global batch)")
    print(f"multi-process overhead per train step: {many['train_step'] - one['train_step']:.0f} ms "
          f"({(many['train_step'] / one['train_step'] - 1) * 100:+.0f} %)")


if __name__ == "__main__":
    app.run(main)
