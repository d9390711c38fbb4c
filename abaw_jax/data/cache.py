"""Where a run's records come from: a records folder, an Aff-Wild2 tree prepared once into the
cache, or (no data given) the synthetic Aff-Wild2 generated and prepared once into the cache.

Every process may call `records_for` at the same time: each builds into a private temporary
folder and renames it into place; the first rename wins, the others discard their copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from abaw_jax.data import affwild2, prepare, records, synthetic


def cache_dir() -> Path:
    """$ABAW_JAX_CACHE, else ~/.cache/abaw_jax."""
    return Path(os.environ.get("ABAW_JAX_CACHE", Path.home() / ".cache" / "abaw_jax"))


def _key(payload: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def _records_dir(path: Path, task: str) -> Path | None:
    """`path` or `path/<task>` when it holds records of `task` (per its stats.json)."""
    for candidate in (path, path / task):
        if (candidate / "dataset_info.json").is_file():
            stats = candidate / "stats.json"
            written = json.loads(stats.read_text()).get("task") if stats.is_file() else task
            if written == task:
                return candidate
    return None


def _build_once(target: Path, build) -> Path:
    if target.exists():
        return target
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    try:
        os.rename(tmp, target)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.exists():
            raise
    return target


def records_for(data: Mapping[str, Any], task: str, test: bool = False) -> Path:
    """The records folder (with dataset_info.json) of `task` for a config's `data` block: the
    train and validation splits, or with `test` the test split (the frames of the challenge's
    test list), which the cache writes to a folder of its own (`<task>-test`)."""
    if data.get("records"):
        found = _records_dir(Path(data["records"]), task)
        if not found:
            raise affwild2.DataError(f"{data['records']}: no records of task {task!r} "
                                     "(expected dataset_info.json here or in <records>/<task>)")
        if test and "test" not in records.read_info(found)["splits"]:
            raise affwild2.DataError(f"{found}: no test split; write one with `python -m "
                                     f"abaw_jax.data.prepare --task={task} --splits=test ...` "
                                     "or give data.root")
        return found
    if data.get("root"):
        root = Path(data["root"]).absolute()
        found = _records_dir(root, task)
        if found and not test:
            return found
        options = {"root": str(root), "task": task, "strict": bool(data.get("strict", False)),
                   "format": data.get("format", "tfrecord"), "seed": data.get("seed", 0)}
        base = cache_dir() / f"records-{_key(options)}"
    else:
        spec = synthetic.SyntheticSpec(**dict(data.get("synthetic") or {}), audio=False)
        root = _build_once(cache_dir() / f"synthetic-{_key(spec.__dict__)}",
                           lambda out: synthetic.generate(out, spec))
        options = {"root": str(root), "task": task, "strict": bool(data.get("strict", False)),
                   "format": "tfrecord", "seed": 0}
        base = root.parent / f"{root.name}-records"
    name, splits = (f"{task}-test", ("test",)) if test else (task, affwild2.SPLITS)
    return _build_once(base / name, lambda out: _prepare(root, out, options, splits))


def _prepare(root: Path, out: Path, options: Mapping[str, Any],
             splits: tuple[str, ...]) -> None:
    layout = affwild2.Layout.discover(root)
    prepare.prepare(layout, options["task"], out, splits=splits, fmt=options["format"],
                    seed=options["seed"], strict=options["strict"], progress=False)
