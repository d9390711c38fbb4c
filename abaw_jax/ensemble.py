"""`python -m abaw_jax.ensemble --workdirs=a,b,c,d,e --out=DIR`: one submission from the
fold models of a cross-validation (runs of one config with `data.folds=k` and each
`data.fold` once; any model family).

Each fold model (its `--checkpoint`, 'best' by default) predicts its held-out fold (its
out-of-fold predictions) and the test split, through predict.py's code path. The
post-processing is fitted once, on the pooled out-of-fold predictions (`Post.fit`: branch
fusion, smoothing per head, then AU thresholds), and applied to each model's test
predictions; the models then combine per head (`heads.Head.combine`): VA averaged, EXPR by
majority vote of the classes (a tie to the highest mean probability), AU by majority vote of
the 0/1 decisions at the fitted thresholds (a tie by the mean probability). Writes the checked
submission (`<out>/<head>/<video>.txt`, multi-task `<out>/mtl/predictions.txt`) and
`<out>/report.json`: each fold's out-of-fold scores and the pooled ones, all with the pooled
post-processing. Each run picked its checkpoint on its held-out fold, so these scores lean
optimistic. Workdirs whose configs disagree on the task (heads) or the folds, or that hold out
the same fold, are refused.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags, logging

from abaw_jax import console, errors, extract, heads, parallel, postprocess, predict, tasks
from abaw_jax import state as state_lib
from abaw_jax.data import cache, folds, records
from abaw_jax.errors import ConfigError
from abaw_jax.evaluators import abaw, split

REPORT_FILE = "report.json"
# What the fold models must share: the heads, and the data the folds were made of.
_SHARED = ("task", "data.folds", "data.fold_seed", "data.train_split", "data.eval_split",
           "data.root", "data.records", "data.synthetic", "data.strict")


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
    value = config
    for part in key.split("."):
        value = value.get(part) if value is not None else None
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def check_members(workdirs: Sequence[Path], configs: Sequence[ml_collections.ConfigDict]
                  ) -> None:
    """ConfigError (one line) unless the runs are fold runs of the same task and folds, each
    holding out another fold, with the same fold lists (folds.json)."""
    held: dict[int, Path] = {}
    first = folds.read_file(workdirs[0]) if configs[0].data.get("folds") else None
    for workdir, config in zip(workdirs, configs, strict=True):
        if not config.data.get("folds"):
            raise ConfigError(f"{workdir}: not a fold run (data.folds=0)")
        for key in _SHARED:
            if _get(config, key) != _get(configs[0], key):
                raise ConfigError(f"{workdir}: {key}={_get(config, key)!r}, but "
                                  f"{workdirs[0]}: {_get(configs[0], key)!r}; the fold models "
                                  "must share their heads and folds")
        fold = config.data.fold
        if fold in held:
            raise ConfigError(f"{held[fold]} and {workdir} both hold out fold {fold}")
        held[fold] = workdir
        if folds.read_file(workdir)["videos"] != first["videos"]:
            raise ConfigError(f"{workdir}: its folds.json lists other videos than "
                              f"{workdirs[0]}'s (other data)")


def _pooled(results: Sequence[dict], eval_splits: Sequence[records.Subset]
            ) -> tuple[dict, records.Subset]:
    """The out-of-fold predictions of all folds as one result, and the subset they cover (the
    folds' records, fold after fold)."""
    keys = set.intersection(*(set(r["preds"]) for r in results))
    pooled = {"preds": {k: np.concatenate([r["preds"][k] for r in results]) for k in keys},
              "labels": {k: np.concatenate([r["labels"][k] for r in results])
                         for k in results[0]["labels"]}}
    return pooled, records.Subset("folds-pooled", tuple(p for s in eval_splits for p in s.parts))


def _jsonable(metrics: dict) -> dict:
    """Metrics as a checkpoint stores them (`Post.from_metrics` reads them back)."""
    return json.loads(json.dumps(metrics, default=float))


def run(workdirs: Sequence[str | Path], out: str | Path, which: str = "best") -> dict:
    """Writes the fold ensemble's submission and report into `out`; returns the report."""
    workdirs, out = [Path(w) for w in workdirs], Path(out)
    configs = [extract.resolve_features(state_lib.read_config(w)) for w in workdirs]
    check_members(workdirs, configs)
    if len(workdirs) < configs[0].data.folds:
        logging.warning("%d fold models of %d folds: the post-processing is fitted on their "
                        "folds only", len(workdirs), configs[0].data.folds)
    task = tasks.get(configs[0].task)
    data_dir = cache.records_for(configs[0].data, task.name)
    test_dir = cache.records_for(configs[0].data, task.name, test=True)
    index, lengths = predict.read_test(test_dir)
    oof, tests, eval_splits, steps = [], [], [], []
    for workdir, config in zip(workdirs, configs, strict=True):
        member = predict.restore(workdir, config, which)
        eval_splits.append(folds.run_splits(config.data, data_dir)[1])
        oof.append(split.predict_run(member.predict, member.setup, data_dir, eval_splits[-1]))
        tests.append(split.predict_run(member.predict, member.setup, test_dir, "test")["preds"])
        steps.append(member.step)
    pooled, pooled_split = _pooled(oof, eval_splits)
    report = {"pooled": _jsonable(abaw.metrics(task, pooled, data_dir, pooled_split))}
    post = postprocess.Post.from_metrics(report["pooled"], task.heads)
    report["folds"] = [_fold_report(task, post, r, data_dir, s, w, c.data.fold, step)
                       for r, s, w, c, step in zip(oof, eval_splits, workdirs, configs, steps,
                                                   strict=True)]
    applied = [post.apply(t, *index[1:]) for t in tests]
    values = {h: heads.get(h).combine(np.stack([a[h] for a in applied]),
                                      post.thresholds if h == "au" else 0.5)
              for h in task.heads}

    def write() -> None:
        predict.write_submission(out, task, test_dir, values, 0.5, index, lengths)
        (out / REPORT_FILE).write_text(json.dumps(
            {**report, "members": [str(w) for w in workdirs], "checkpoint": which,
             "test_records": str(test_dir)}, indent=1))

    parallel.on_process_0(write, "writing the ensemble's submission")
    logging.info("fold ensemble of %d models: pooled out-of-fold score %.4f (%s); submission "
                 "and %s in %s", len(workdirs), report["pooled"]["score"],
                 report["pooled"].get("score_metric", task.score), REPORT_FILE, out)
    return report


def _fold_report(task: tasks.Task, post: postprocess.Post, result: dict, data_dir: Path,
                 held: records.Subset, workdir: Path, fold: int, step: int) -> dict:
    """A fold model's out-of-fold figures: the task's metrics of its raw outputs, and the
    challenge's with the pooled post-processing."""
    video, frame = records.read_frame_index(data_dir, held)[1:]
    figures = {**task.metrics(result["preds"], result["labels"]),
               **abaw.challenge(task, post.apply(result["preds"], video, frame),
                                post.thresholds, data_dir, held)}
    return {"workdir": str(workdir), "fold": fold, "step": step, "records": len(video),
            **_jsonable(figures)}


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    console.quiet_libraries()
    f = flags.FLAGS
    try:
        parallel.initialize()
        run(f.workdirs, f.out, f.checkpoint)
    except Exception as e:
        if f.traceback or not errors.is_user_error(e):
            raise
        console.exit_with(f"error: {e}")
    parallel.shutdown()


def define_flags() -> None:
    """The CLI's flags, defined only when run as a program."""
    flags.DEFINE_list("workdirs", None, "The fold runs' workdirs, comma-separated.")
    flags.DEFINE_string("out", None, "Folder of the submission and report.json.")
    flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step, of every run.")
    flags.DEFINE_bool("traceback", False, "Show the traceback of user errors.")
    flags.mark_flags_as_required(["workdirs", "out"])


if __name__ == "__main__":
    define_flags()
    app.run(main)
