"""Where a run's records come from: a records folder, an Aff-Wild2 tree prepared once into the
cache, or (no data given) the synthetic Aff-Wild2 generated and prepared once into the cache.

A prepared tree is cached by its path and options, then by its content: `<task>.<content key>/`,
where the key hashes a manifest of what the records were made from (`source_manifest`). A user
who fixes an annotation or a crop under the same root gets records prepared again, and the log
says which files changed.

Every process may call `records_for` at the same time: each builds into a private temporary
folder and renames it into place; the first rename wins, the others discard their copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
from absl import logging

from abaw_jax.data import affwild2, audio, prepare, records, synthetic

SOURCE_FILE = "source.json"  # the manifest a cached build was prepared from
_KEEP_BUILDS = 2  # per cache entry: the current build and the one before it
_LISTED = 5  # changed sources named in the log; the count covers all of them


def cache_dir() -> Path:
    """$ABAW_JAX_CACHE, else ~/.cache/abaw_jax."""
    return Path(os.environ.get("ABAW_JAX_CACHE", Path.home() / ".cache" / "abaw_jax"))


def content_key(payload: Mapping[str, Any]) -> str:
    """A short hash of a JSON-able payload: the cache's folder names."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def _records_dir(path: Path, task: str) -> Path | None:
    """`path` or `path/<task>` when it holds records of `task` (see `records.written_task`)."""
    for candidate in (path, path / task):
        if (candidate / "dataset_info.json").is_file() and records.written_task(candidate) in (
                task, None):
            return candidate
    return None


def records_for(data: Mapping[str, Any], task: str, test: bool = False) -> Path:
    """The records folder (with dataset_info.json) of `task` for a config's `data` block: the
    train and validation splits, or with `test` the test split (the frames of the challenge's
    test list), which the cache writes to a folder of its own (`<task>-test.<content key>`)."""
    if data.get("records"):
        return _given_records(Path(data["records"]), task, test)
    if data.get("root"):
        root = Path(data["root"]).absolute()
        found = _records_dir(root, task)
        if found and not test:
            return found
        options = {"root": str(root), "task": task, "strict": bool(data.get("strict", False)),
                   "format": data.get("format", "tfrecord"), "seed": data.get("seed", 0),
                   "audio": _audio_options(data)}
        base = cache_dir() / f"records-{content_key(options)}"
    else:
        spec = synthetic.SyntheticSpec(**dict(data.get("synthetic") or {}))
        # Keyed by the generator's source too: an edit to it must not reuse a stale tree.
        generator = hashlib.sha256(Path(synthetic.__file__).read_bytes()).hexdigest()
        root = cache_dir() / f"synthetic-{content_key({**spec.__dict__, 'source': generator})}"
        if not root.exists():
            logging.info("generating the synthetic Aff-Wild2 (%d videos) in %s",
                         spec.num_videos, root)
        _build_once(root, lambda out: synthetic.generate(out, spec, progress=_is_first()))
        options = {"root": str(root), "task": task, "strict": bool(data.get("strict", False)),
                   "format": "tfrecord", "seed": 0,
                   "audio": _audio_options(data)}
        base = root.parent / f"{root.name}-records"
    name, splits = (f"{task}-test", ("test",)) if test else (task, affwild2.SPLITS)
    return _current_build(base, name, options, splits)


def _audio_options(data: Mapping[str, Any]) -> dict[str, Any]:
    """What of `data.audio` the prepared records depend on: the stored spectrogram's parameters
    and what a missing track does (`error` stops preparation)."""
    cfg = audio.AudioConfig.from_config(data.get("audio"))
    return {**cfg.key(), "missing": cfg.missing}


def _given_records(path: Path, task: str, test: bool) -> Path:
    found = _records_dir(path, task)
    if not found:
        written = (f" (it holds records of task {records.written_task(path)!r})"
                   if (path / "dataset_info.json").is_file() else "")
        raise affwild2.DataError(f"{path}: no records of task {task!r}{written}; expected "
                                 "dataset_info.json here or in <records>/<task>")
    if test and "test" not in records.read_info(found)["splits"]:
        raise affwild2.DataError(f"{found}: no test split; write one with `python -m "
                                 f"abaw_jax.data.prepare --task={task} --splits=test ...` "
                                 "or give data.root")
    return found


def _current_build(base: Path, name: str, options: Mapping[str, Any],
                   splits: Sequence[str]) -> Path:
    """`base/<name>.<content key>`: the records of the root as it is now, prepared if needed."""
    root = Path(options["root"])
    layout = affwild2.Layout.discover(root)
    manifest = source_manifest(layout, options["task"], splits)
    target = base / f"{name}.{content_key({'sources': manifest, 'audio': options['audio']})}"
    if target.exists():
        with contextlib.suppress(OSError):  # newest = last used, for `_remove_old_builds`
            os.utime(target)
        return target
    logging.info("preparing the %s records of task %s from %s into %s%s", "/".join(splits),
                 options["task"], root, target, _changes(base, name, manifest))

    def build(out: Path) -> None:
        prepare.prepare(layout, options["task"], out, splits=splits, fmt=options["format"],
                        seed=options["seed"], strict=options["strict"], progress=_is_first(),
                        audio=audio.AudioConfig(**options["audio"]))
        (out / SOURCE_FILE).write_text(json.dumps(manifest))

    _build_once(target, build)
    _remove_old_builds(base, name)
    return target


# ----------------------------------------------------------------------------------------------
# The content key


def source_manifest(layout: affwild2.Layout, task: str,
                    splits: Sequence[str]) -> dict[str, list]:
    """What the records of `task` are made from: {path: [size, mtime_ns]} of every annotation
    file the splits read (and the test list), and {crop folder/: [files, digest]} of every video
    folder in the image roots, the digest hashing the name, size and mtime of each of its files.

    It detects an edited, added, removed or renamed annotation file or crop, also one rewritten
    in place (the folder's own mtime would miss that). It cannot see an edit that keeps a file's
    size and mtime (a tool that restores the mtime; a rewrite within the file system's mtime
    granularity that keeps the size), nor changes outside the root's annotation files and
    crops. Cost: one stat per file, 2.3-2.5 us each with a warm page cache on the 2-core
    machine, so ~8 s for 3M crops, per process and run start (`benchmarks/records.py` prints
    it); keying on the folders only would cost ~1 ms but miss crops rewritten in place.
    """
    files = [layout.test_list(task) if split == "test" else layout.task_dir(task, split)
             for split in splits]
    annotations = [f for p in files
                   for f in (sorted(p.iterdir()) if p.is_dir() else [p] if p.exists() else [])]
    base = layout.root or layout.annotations.parent
    entries: dict[str, list] = {}
    for path in annotations:
        st = path.stat()
        entries[os.path.relpath(path, base)] = [st.st_size, st.st_mtime_ns]
    for image_root in layout.image_roots:
        with os.scandir(image_root) as videos:
            for video in videos:
                if video.is_dir():
                    entries[os.path.relpath(video.path, base) + "/"] = _folder_digest(video.path)
    for folder in layout.video_roots:  # the raw videos and .wavs: audio and frame counts
        entries[os.path.relpath(folder, base) + "/"] = _folder_digest(str(folder))
    if layout.video_info:
        st = layout.video_info.stat()
        entries[os.path.relpath(layout.video_info, base)] = [st.st_size, st.st_mtime_ns]
    return entries


def _folder_digest(path: str) -> list:
    digest = hashlib.blake2b(digest_size=8)
    with os.scandir(path) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        st = e.stat()
        digest.update(f"{e.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return [len(entries), digest.hexdigest()]


def _changes(base: Path, name: str, manifest: Mapping[str, list]) -> str:
    """Why an earlier build of this cache entry is not used: the sources that changed."""
    builds = _builds(base, name)
    if not builds:
        return ""
    old = json.loads((builds[0] / SOURCE_FILE).read_text())
    parts = []
    for what, names in (("changed", [k for k in manifest if k in old and old[k] != manifest[k]]),
                        ("new", [k for k in manifest if k not in old]),
                        ("gone", [k for k in old if k not in manifest])):
        if names:
            more = f", ... ({len(names) - _LISTED} more)" if len(names) > _LISTED else ""
            parts.append(f"{len(names)} {what}: {', '.join(names[:_LISTED])}{more}")
    return f", because the data changed since {builds[0].name} was prepared ({'; '.join(parts)})"


def _builds(base: Path, name: str) -> list[Path]:
    """Finished builds of a cache entry, last used first."""
    found = [p for p in base.glob(f"{name}.*")
             if ".tmp-" not in p.name and (p / SOURCE_FILE).is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def _remove_old_builds(base: Path, name: str) -> None:
    """Keeps the current build and the one before it (a run started earlier may still read it),
    so that fixing the data again and again does not fill the disk. `base/<name>` itself is a
    build of the cache before content keys (records of unknown content): removed too."""
    former = [base / name] if (base / name / "dataset_info.json").is_file() else []
    for old in [*_builds(base, name)[_KEEP_BUILDS:], *former]:
        logging.info("removing the records of older data %s", old)
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Building once, across processes and signals


class Terminated(SystemExit):
    """SIGTERM arrived while the cache was built: the build was stopped and its folder removed.
    Exits with 143 (128 + SIGTERM) like the signal's default action, unless caught."""


def _build_once(target: Path, build: Callable[[Path], Any]) -> Path:
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_tmp(target)
    tmp = target.with_name(f"{target.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with _sigterm_raises(tmp):
            build(tmp)
    except BaseException:  # an error, Ctrl-C or SIGTERM: leave no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, target)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.exists():
            raise
    return target


@contextlib.contextmanager
def _sigterm_raises(tmp: Path) -> Iterator[None]:
    """SIGTERM raises `Terminated` in the main thread, so that the prepare workers are stopped
    and `tmp` is removed on the way out; a handler installed before (e.g. the trainer's
    preemption flag) is called first. Elsewhere than the main thread, signals stay as they are;
    so do they with several processes, where JAX's preemption service holds SIGTERM (a Python
    handler would replace its handler, and restoring Python's record of the previous one, the
    default action, would not give it back): the run stops at its first step there."""
    if (threading.current_thread() is not threading.main_thread()
            or jax.process_count() > 1):
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        if callable(previous):
            previous(signum, frame)
        logging.warning("SIGTERM while building %s: stopping and removing it", tmp)
        raise Terminated(128 + signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _remove_dead_tmp(target: Path) -> None:
    """Removes `<target>.tmp-<host>-<pid>` folders of this host's processes that are gone (killed
    before they could clean up); other hosts' folders may belong to live builds."""
    host = socket.gethostname()
    for tmp in target.parent.glob(f"{target.name}.tmp-*"):
        owner, _, pid = tmp.name.split(".tmp-", 1)[1].rpartition("-")
        if owner == host and pid.isdigit() and not _alive(int(pid)):
            logging.info("removing %s, left by a build that was killed", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _is_first() -> bool:
    """Process 0 shows what the cache is doing; the others build their copy silently."""
    return jax.process_index() == 0
