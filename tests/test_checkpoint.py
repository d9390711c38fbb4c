"""Checkpoints: newest restorable step, corrupt and half-written checkpoints set aside."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from abaw_jax import checkpoint

ABSTRACT = {"w": jax.ShapeDtypeStruct((64,), jnp.float32),
            "step": jax.ShapeDtypeStruct((), jnp.int32)}


def _state(step):
    return {"w": jnp.arange(64, dtype=jnp.float32) + step, "step": jnp.asarray(step, jnp.int32)}


def _saved(directory, steps):
    ckpt = checkpoint.Checkpoints(directory, keep=10)
    for s in steps:
        ckpt.save(s, _state(s))
    ckpt.wait()
    ckpt.close()


def test_restore_latest_takes_the_newest(tmp_path):
    _saved(tmp_path, [2, 4])
    ckpt = checkpoint.Checkpoints(tmp_path)
    step, state = ckpt.restore_latest(ABSTRACT)
    assert step == 4 and int(state["step"]) == 4
    np.testing.assert_array_equal(state["w"], _state(4)["w"])
    ckpt.close()
    assert checkpoint.Checkpoints(tmp_path / "empty").restore_latest(ABSTRACT) is None


@pytest.mark.parametrize("damage", ["corrupt", "half_written", "no_layout"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, caplog):
    _saved(tmp_path, [2, 4, 6])
    if damage == "corrupt":  # bytes overwritten on disk
        for f in (tmp_path / "6" / "state").rglob("*"):
            if f.is_file() and f.parent.name == "d":
                f.write_bytes(b"\0" * 16)
    elif damage == "half_written":  # a killed writer without atomic renames: files missing
        shutil.rmtree(tmp_path / "6" / "state" / "d")
        shutil.rmtree(tmp_path / "6" / "state" / "ocdbt.process_0")
    else:  # its layout item lost: damage too, as long as an older step has one
        shutil.rmtree(tmp_path / "6" / "layout")
    ckpt = checkpoint.Checkpoints(tmp_path)
    with caplog.at_level("WARNING"):
        step, state = ckpt.restore_latest(ABSTRACT)
    assert step == 4 and int(state["step"]) == 4
    assert "checkpoint step 6" in caplog.text and "falling back" in caplog.text
    assert ckpt.steps() == [2, 4] and (tmp_path / "corrupt-6").is_dir()  # kept for inspection
    ckpt.save(6, _state(7))  # the step can be written again
    ckpt.wait()
    assert ckpt.restore_latest(ABSTRACT)[0] == 6
    ckpt.close()


def test_when_no_checkpoint_restores_nothing_is_moved(tmp_path):
    _saved(tmp_path, [2, 4])
    ckpt = checkpoint.Checkpoints(tmp_path)
    other_model = {**ABSTRACT, "new_layer": jax.ShapeDtypeStruct((3,), jnp.float32)}
    with pytest.raises(RuntimeError, match="no checkpoint .* restores; step 4"):
        ckpt.restore_latest(other_model)
    assert ckpt.steps() == [2, 4] and not list(tmp_path.glob("corrupt-*"))
    ckpt.close()


def test_a_checkpoint_of_another_state_layout_is_refused_not_set_aside(tmp_path):
    _saved(tmp_path, [2, 4])
    for step in (2, 4):  # as written before the layout item existed (layout 1)
        shutil.rmtree(tmp_path / str(step) / "layout")
    ckpt = checkpoint.Checkpoints(tmp_path)
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match="layout 1.*reads layout 2"):
        ckpt.restore_latest(ABSTRACT)
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match="layout 1"):
        ckpt.restore(2, ABSTRACT)
    assert ckpt.steps() == [2, 4] and not list(tmp_path.glob("corrupt-*"))
    ckpt.close()
