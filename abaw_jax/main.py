"""Entry point: `python -m abaw_jax.main --config=configs/va.py [--workdir=DIR] [--mode=...]`."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before clu imports TensorFlow

import logging as pylogging  # noqa: E402

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from abaw_jax import evaluate, extract, parallel, predict, trainers  # noqa: E402

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
flags.mark_flags_as_required(["config"])

_CHATTY = ("/orbax/", "/grain/", "/jax/_src/")


class _LibraryInfoFilter(pylogging.Filter):
    """Orbax logs a dozen INFO lines per checkpoint; keep the console for progress."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or not any(
            s in record.pathname for s in _CHATTY)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_LibraryInfoFilter())
    parallel.initialize()
    parallel.check_host_allocator()
    if jax.process_index() > 0:  # the processes log the same lines: keep process 0's
        logging.set_verbosity(logging.WARNING)
    workdir = FLAGS.workdir or f"workdirs/{FLAGS.config.task}"
    if FLAGS.mode in ("predict", "extract"):
        {"predict": predict.run, "extract": extract.run}[FLAGS.mode](
            FLAGS.config, workdir, FLAGS.checkpoint)
        return
    if FLAGS.mode == "train":
        metrics = trainers.train_and_evaluate(FLAGS.config, workdir)
    else:
        metrics = evaluate.run(FLAGS.config, workdir, FLAGS.checkpoint)
    logging.info("final metrics: %s",
                 {k: v for k, v in metrics.items() if not isinstance(v, list | dict)})


if __name__ == "__main__":
    app.run(main)
