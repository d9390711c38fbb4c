r"""Compile time of a run's initialiser (`state.init_state`: the model's random variables and the
optimizer state in one program) at XLA's default backend optimisation level and at level 0,
which `init_state` uses on CPU (the program runs once), with its run time and the largest
difference between the two initial states.

  python benchmarks/init_compile.py [--task=va] [--model=ddamfn_tiny] [--repeats=2]

Prints `<name>: <value> <unit>` lines. No persistent compilation cache is used.
"""

import time

import jax
import numpy as np
from absl import app, flags

from abaw_jax import config_lib, parallel
from abaw_jax import state as state_lib

flags.DEFINE_string("task", "va", "Task of the DDAMFN experiment config.")
flags.DEFINE_string("model", "ddamfn_tiny", "model.name (ddamfn_tiny: the tests' model).")
flags.DEFINE_integer("repeats", 2, "Compiles per level (the fastest is printed).")
FLAGS = flags.FLAGS


def _compile(lowered_fn, options: dict | None) -> tuple[float, jax.stages.Compiled]:
    start = time.perf_counter()
    compiled = lowered_fn().compile(compiler_options=options)
    return time.perf_counter() - start, compiled


def main(_):
    jax.config.update("jax_enable_compilation_cache", False)
    config = config_lib.experiment(FLAGS.task)
    config.model.name = FLAGS.model
    setup = state_lib.make_setup(config, parallel.make_mesh())
    init = state_lib._init_fn(config, setup)
    sharding = state_lib.state_sharding(setup, jax.eval_shape(init))

    def lowered():  # a fresh jit each time: nothing reused from the last compile
        return jax.jit(lambda: init(), out_shardings=sharding).lower()

    states = {}
    for name, options in (("default", None), ("level_0", {"xla_backend_optimization_level": 0})):
        seconds, compiled = min((_compile(lowered, options) for _ in range(FLAGS.repeats)),
                                key=lambda x: x[0])
        start = time.perf_counter()
        states[name] = jax.block_until_ready(compiled())
        ran = time.perf_counter() - start
        print(f"{name}_compile: {seconds:.2f} s")
        print(f"{name}_run: {1e3 * ran:.1f} ms")
    diff = max(float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
               for a, b in zip(jax.tree.leaves(states["default"].params),
                               jax.tree.leaves(states["level_0"].params), strict=True))
    print(f"largest_parameter_difference: {diff:.3g}")


if __name__ == "__main__":
    app.run(main)
