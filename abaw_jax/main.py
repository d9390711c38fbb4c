"""Entry point: `python -m abaw_jax.main --config=configs/va.py [--workdir=DIR] [--mode=...]`."""

import os

# Before clu imports TensorFlow (for TensorBoard summaries only; no TensorFlow op runs here):
# quiet its C++ INFO lines, and oneDNN's notice, which came twice per process (5 times a run with
# grain workers) with absl's "All log messages before absl::InitializeLog()" line.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from abaw_jax import (  # noqa: E402
    config_lib,
    console,
    errors,
    evaluate,
    extract,
    models,
    parallel,
    predict,
    trainers,
)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run folder: checkpoints, logs, eval outputs "
                    "(default: workdirs/<config task>).")
flags.DEFINE_enum("mode", "train", ["train", "eval", "predict", "extract"],
                  "train (resumes by itself), eval (validation metrics, files, plots), predict "
                  "(ABAW submission files for the test list) or extract (per-frame backbone "
                  "embeddings of every split into <workdir>/features).")
flags.DEFINE_string("checkpoint", "best", "eval/predict/extract: 'best', 'latest' or a step.")
flags.DEFINE_bool("traceback", False, "Show the traceback of user errors (bad config, data, "
                  "checkpoint, disk) instead of their one `error:` line.")
flags.mark_flags_as_required(["config"])

def _run(config, workdir: str) -> dict | None:
    config_lib.check(config, jax.device_count())
    config = extract.resolve_features(config)  # data.features=auto: extracted once, cached
    if FLAGS.mode == "train":
        parallel.check_host_allocator()  # advice for the train step: eval/predict need none
        return trainers.train_and_evaluate(config, workdir)
    if not models.get(config.model.name).labels:
        raise errors.ConfigError(
            f"--mode={FLAGS.mode}: model {config.model.name!r} is trained without labels and "
            f"predicts none; its training evaluations wrote the validation reconstruction loss "
            f"and reconstruction-<step>.png to {workdir}, and inference.load({workdir!r}) "
            f"reconstructs faces")
    if FLAGS.mode == "eval":
        return evaluate.run(config, workdir, FLAGS.checkpoint)
    {"predict": predict.run, "extract": extract.run}[FLAGS.mode](config, workdir,
                                                                  FLAGS.checkpoint)
    return None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    console.quiet_libraries()
    try:
        parallel.initialize()
        if jax.process_index() > 0:  # the processes log the same lines: keep process 0's
            logging.set_verbosity(logging.WARNING)
        metrics = _run(FLAGS.config, FLAGS.workdir or f"workdirs/{FLAGS.config.task}")
    except Exception as e:
        if FLAGS.traceback or not errors.is_user_error(e):
            raise
        console.exit_with(f"error: {e}")
    parallel.shutdown()
    if metrics:
        which = ("the last step's" if FLAGS.mode == "train"
                 else f"checkpoint step {metrics.get('step')}'s")
        logging.info("final metrics (%s): %s", which,
                     {k: v for k, v in metrics.items() if not isinstance(v, list | dict)})


if __name__ == "__main__":
    app.run(main)
