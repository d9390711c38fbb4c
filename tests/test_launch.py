"""launch/ scripts with stand-in `srun`, `scontrol` and `gcloud` that record their arguments,
and `parallel.initialize`'s reading of the cluster environment."""

import os
import subprocess
from pathlib import Path

import pytest

from abaw_jax import parallel

ROOT = Path(__file__).parents[1]


def _fake(bin_dir: Path, name: str, body: str = "") -> Path:
    """A command that appends its arguments (one line per call) to <bin_dir>/<name>.calls."""
    path = bin_dir / name
    path.write_text(f'#!/usr/bin/env bash\necho "$*" >> "{bin_dir}/{name}.calls"\n{body}\n')
    path.chmod(0o755)
    return bin_dir / f"{name}.calls"


def _run(cmd, bin_dir, **env):
    full = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **env}
    return subprocess.run(cmd, cwd=ROOT, env=full, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("preempted", [True, False])
def test_slurm_script_runs_one_task_per_node_and_requeues_after_preemption(tmp_path, preempted):
    workdir = tmp_path / "run"
    workdir.mkdir()
    # srun stands in for the job step; it leaves the marker a preempted run writes.
    srun = _fake(tmp_path, "srun", f'echo 7 > "{workdir}/PREEMPTED"' if preempted else "")
    scontrol = _fake(tmp_path, "scontrol")
    proc = _run(["bash", "launch/slurm.sbatch", "configs/va.py:real", str(workdir),
                 "--config.batch_size=512"], tmp_path, SLURM_JOB_ID="42",
                SLURM_SUBMIT_DIR=str(ROOT), SLURM_CPUS_PER_TASK="32")
    assert proc.returncode == 0, proc.stderr
    assert srun.read_text().split() == [
        "--kill-on-bad-exit=1", "--ntasks-per-node=1", "--cpus-per-task=32", "python", "-m",
        "abaw_jax.main",
        "--config=configs/va.py:real", f"--workdir={workdir}", "--config.batch_size=512"]
    if preempted:
        assert scontrol.read_text() == "requeue 42\n" and "preempted at step 7" in proc.stdout
    else:
        assert not scontrol.exists()


def test_tpu_script_runs_the_same_command_on_every_worker(tmp_path):
    gcloud = _fake(tmp_path, "gcloud")
    proc = _run(["bash", "launch/tpu_pod.sh", "run", "my-tpu", "us-central2-b", "configs/au.py",
                 "/mnt/runs/au", "--config.seed=3"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    call = gcloud.read_text()
    assert call.startswith("compute tpus tpu-vm ssh my-tpu --zone=us-central2-b --worker=all")
    assert ("python -m abaw_jax.main --config=configs/au.py --workdir=/mnt/runs/au "
            "--config.seed=3") in call
    # Without overrides: no empty argument reaches main ('' would be an unexpected argument).
    proc = _run(["bash", "launch/tpu_pod.sh", "run", "my-tpu", "z", "configs/au.py", "/w"],
                tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--workdir=/w 2>&1" in gcloud.read_text().splitlines()[-1]
    proc = _run(["bash", "launch/tpu_pod.sh", "setup", "my-tpu", "us-central2-b"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    scp, ssh = gcloud.read_text().splitlines()[2:]
    assert scp.startswith("compute tpus tpu-vm scp") and "--worker=all" in scp
    assert "pip install" in ssh and "-e ." in ssh


def test_scripts_refuse_missing_arguments(tmp_path):
    for cmd in (["bash", "launch/local.sh", "2"], ["bash", "launch/tpu_pod.sh", "run", "t", "z"],
                ["bash", "launch/slurm.sbatch", "configs/va.py"]):
        proc = _run(cmd, tmp_path)
        assert proc.returncode == 2 and "usage" in proc.stderr.lower(), (cmd, proc.stderr)


@pytest.mark.parametrize("env, want", [
    ({"SLURM_NTASKS": "4", "SLURM_NNODES": "4", "SLURM_GPUS_ON_NODE": "8"}, list(range(8))),
    ({"SLURM_NTASKS": "8", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4",
      "SLURM_GPUS_ON_NODE": "4"}, None),  # one GPU per task: JAX's own SLURM default
    ({"SLURM_NTASKS": "2", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8",
      "JAX_LOCAL_DEVICE_IDS": "0,1"}, [0, 1]),
])
def test_slurm_environment_gives_each_task_its_gpus(monkeypatch, env, want):
    for key in list(os.environ):
        if key.startswith(("SLURM_", "JAX_COORDINATOR", "JAX_LOCAL", "TPU_")):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # restored after it
    calls = []
    monkeypatch.setattr(parallel.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    parallel.initialize(timeout_s=5)
    assert calls == [{"local_device_ids": want, "initialization_timeout": 5}]


def _allocator(cmd, **env):
    base = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    out = subprocess.run([*cmd, "python", "-c", "from abaw_jax import parallel; "
                          "print(parallel.host_allocator())"], cwd=ROOT, env={**base, **env},
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return out.split()[-1]


def test_host_allocator_names_the_malloc_and_local_sh_preloads_tcmalloc():
    has_tcmalloc = subprocess.run("ldconfig -p | grep -q libtcmalloc_minimal.so.4",
                                  shell=True).returncode == 0
    assert _allocator([]) == "glibc"
    assert _allocator(["launch/local.sh", "1"], LD_PRELOAD="") == "glibc"
    assert _allocator(["launch/local.sh", "1"]) == ("tcmalloc" if has_tcmalloc else "glibc")
    if has_tcmalloc:
        assert _allocator([], LD_PRELOAD=parallel.TCMALLOC) == "tcmalloc"


def test_cpu_backend_on_glibc_malloc_warns_with_the_command(monkeypatch, caplog):
    for name, warns in (("glibc", True), ("tcmalloc", False)):
        caplog.clear()
        monkeypatch.setattr(parallel, "host_allocator", lambda name=name: name)
        parallel.check_host_allocator()
        assert (f"LD_PRELOAD={parallel.TCMALLOC}" in caplog.text) == warns
