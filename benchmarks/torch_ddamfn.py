r"""The same DDAMFN train step and inference in PyTorch, for a same-machine, same-hour baseline.

  python benchmarks/torch_ddamfn.py [--batch=32] [--steps=5] [--threads=0]

Times the PyTorch DDAMFN that the parity tests are checked against (`tests/reference/ddamfn.py`,
built from shared/specs/ddamfn.md, same layers as the official `DDAMNet` forward) in train mode:
forward, an MSE loss on the 8 logits, backward and an Adam step; then the eval-mode forward
under `torch.no_grad()`, both on random inputs at --batch (median of --steps runs after one
warm-up). Prints `train_step: <x> images/s` and `inference: <x> images/s` like
benchmarks/train_step.py, so the two can be run back to back: this CPU's speed drifts by 10-30 %
over a day, which moves both. The allocator matters to both (PyTorch trains ~25 % faster on
tcmalloc too): compare like with like, `LD_PRELOAD=libtcmalloc_minimal.so.4` on both or neither;
the first line says which malloc ran.
"""

import importlib.util
import statistics
import time
from pathlib import Path

import torch
from absl import app, flags

from abaw_jax import parallel

# The reference lives with the tests (test-only, not part of abaw_jax): load that one file by
# path, so that neither `tests` on sys.path nor an import of a test module is needed.
_REF_PATH = Path(__file__).resolve().parents[1] / "tests/reference/ddamfn.py"
_spec = importlib.util.spec_from_file_location("ddamfn_reference", _REF_PATH)
ref_ddamfn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref_ddamfn)

flags.DEFINE_integer("batch", 32, "Images per batch.")
flags.DEFINE_integer("steps", 5, "Timed repetitions (after one warm-up).")
flags.DEFINE_integer("threads", 0, "torch.set_num_threads; 0 keeps PyTorch's default.")
FLAGS = flags.FLAGS


def _median_seconds(fn, steps: int) -> float:
    fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv):
    del argv
    if FLAGS.threads:
        torch.set_num_threads(FLAGS.threads)
    torch.manual_seed(0)
    model = ref_ddamfn.RefDDAMNet()
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    images = torch.randn(FLAGS.batch, 3, 112, 112)
    targets = torch.randn(FLAGS.batch, 8)

    def train_step():
        optimizer.zero_grad()
        loss = ((model(images)[0] - targets) ** 2).mean()
        loss.backward()
        optimizer.step()

    def inference():
        with torch.no_grad():
            model(images)

    model.train()
    t_train = _median_seconds(train_step, FLAGS.steps)
    model.eval()
    t_infer = _median_seconds(inference, FLAGS.steps)
    n = FLAGS.batch
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {n}, "
          f"malloc {parallel.host_allocator()}")
    print(f"train_step: {n / t_train:.1f} images/s ({t_train * 1000:.0f} ms/step)")
    print(f"inference: {n / t_infer:.1f} images/s ({t_infer * 1000:.0f} ms/batch)")


if __name__ == "__main__":
    app.run(main)
