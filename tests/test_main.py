"""The command line as a user meets it: config checks before anything is written, user errors as
one `error:` line (the traceback with --traceback), progress lines with an honest ETA."""

import errno
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_config

from abaw_jax import config_lib, errors
from abaw_jax.trainers import loop

ROOT = Path(__file__).parents[1]


def _main(*args: str) -> subprocess.CompletedProcess:
    """`python -m abaw_jax.main ARGS` (8 fake devices: conftest's XLA_FLAGS are inherited)."""
    return subprocess.run([sys.executable, "-m", "abaw_jax.main", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=600)


def test_sigterm_during_start_up_exits_0_with_preempted_and_leaves_no_half_cache(
        tiny_tree, tmp_path):
    # SIGTERM while the data cache is prepared (the first minutes of a first run): the writers
    # stop, the half-written folder goes, PREEMPTED says so and the exit status asks a requeue.
    workdir, cache_dir = tmp_path / "run", tmp_path / "cache"
    env = {**os.environ, "ABAW_JAX_CACHE": str(cache_dir)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "abaw_jax.main", "--config=configs/va.py", f"--workdir={workdir}",
         f"--config.data.root={tiny_tree[0]}"], cwd=ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output = []
        for line in proc.stdout:  # the build logs its start; signal it then
            output.append(line)
            if "preparing the train/validation records" in line:
                proc.send_signal(signal.SIGTERM)
                break
        output += proc.stdout.readlines()
        assert proc.wait(timeout=300) == 0, "".join(output)
    finally:
        proc.kill()
    output = "".join(output)
    assert "SIGTERM during start-up" in output and "Traceback" not in output, output
    assert (workdir / "PREEMPTED").read_text() == "start-up\n"
    assert not list(cache_dir.glob("records-*/*.tmp-*")) and not (workdir / "checkpoints").exists()


@pytest.mark.parametrize("key, value, message", [
    ("batch_size", 0, "batch_size=0 must be a positive multiple of the 8 devices"),
    ("batch_size", -4, "batch_size=-4 must be a positive multiple of the 8 devices"),
    ("batch_size", 12, "batch_size=12 must be a positive multiple of the 8 devices"),
    ("eval_batch_size", 4, "eval_batch_size=4 must be a positive multiple"),
    ("total_steps", -1, "total_steps=-1 must be >= 0"),
    ("log_every_steps", 0, "log_every_steps=0 must be a positive integer"),
    ("eval_every_steps", 0, "eval_every_steps=0 must be a positive integer"),
])
def test_config_check_names_the_key(key, value, message):
    config = tiny_config(None, **{key: value})
    with pytest.raises(errors.ConfigError, match=f"^config: {message}"):
        config_lib.check(config, 8)
    config_lib.check(tiny_config(None), 8)  # the tests' own config passes


def test_a_bad_eval_batch_size_stops_the_run_before_anything_is_written(tiny_records, tmp_path):
    # It used to surface at the first evaluation, after the steps before it were trained.
    workdir = tmp_path / "run"
    run = _main("--config=configs/va.py", f"--workdir={workdir}",
                f"--config.data.records={tiny_records}", "--config.eval_batch_size=12")
    assert run.returncode == 1, run.stderr[-3000:]
    assert run.stderr.strip().splitlines()[-1] == (
        "error: config: eval_batch_size=12 must be a positive multiple of the 8 devices (it is "
        "split evenly over them)")
    assert "Traceback" not in run.stderr and not workdir.exists()


def test_user_errors_are_one_line_and_the_traceback_is_a_flag(tmp_path):
    args = ("--config=configs/va.py", "--mode=eval", f"--workdir={tmp_path / 'none'}")
    run = _main(*args)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        f"error: no checkpoints in {tmp_path / 'none' / 'checkpoints'}")
    assert "Traceback" not in run.stderr
    # Nor the console's old noise: the tcmalloc advice (for train steps only), TensorFlow's
    # oneDNN notice and absl's pre-init line (which came twice per process).
    for noise in ("tcmalloc", "oneDNN", "absl::InitializeLog"):
        assert noise not in run.stderr
    run = _main(*args, "--traceback")
    assert run.returncode == 1 and "Traceback" in run.stderr and "NoCheckpointError" in run.stderr


def test_what_counts_as_a_user_error():
    assert errors.is_user_error(errors.ConfigError("x"))
    assert errors.is_user_error(OSError(errno.ENOSPC, "No space left on device", "/w/ckpt"))
    assert errors.is_user_error(PermissionError(errno.EACCES, "Permission denied", "/w"))
    assert not errors.is_user_error(ValueError("a bug"))
    assert not errors.is_user_error(OSError(errno.EBADF, "Bad file descriptor"))
    # The registries' KeyErrors print their message unquoted.
    assert str(errors.UnknownNameError("unknown model 'x'")) == "unknown model 'x'"


def test_progress_rate_and_eta_leave_out_the_compiling_steps_and_evaluations(monkeypatch, caplog):
    clock = [0.0]
    monkeypatch.setattr(loop.time, "monotonic", lambda: clock[0])
    progress = loop.Progress(start=0, total=300, eval_every=100)
    caplog.set_level(logging.INFO)
    clock[0] = 52.0  # 25 steps, most of it compiling
    progress.log(25)
    assert "step 25/300: first steps took 52s (compiling)" in caplog.text
    clock[0] = 62.0  # 25 steps at 0.4 s
    progress.log(50)
    # 250 steps at 0.4 s; no evaluation timed yet.
    assert "step 50/300 (17%): 0.40 s/step; about 1m40s left" in caplog.text
    clock[0] = 82.0  # steps 51-100 at 0.4 s
    progress.log(100)
    with progress.timed_eval():
        clock[0] = 102.0  # a 20 s evaluation at step 100
    clock[0] = 122.0  # steps 101-150 at 0.4 s
    progress.log(150)
    # Still 0.4 s/step: 150 steps (60 s) and the evaluations at 200 and 300 (40 s).
    assert "step 150/300 (50%): 0.40 s/step; about 1m40s left, 2 evaluations of ~20s each" in (
        caplog.text)
