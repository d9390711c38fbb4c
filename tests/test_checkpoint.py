"""Checkpoints: newest restorable step, corrupt and half-written checkpoints set aside."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

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


@struct.dataclass
class TrainState:  # as state.TrainState: parameters and the optimizer state apart
    step: jax.Array
    params: dict
    opt_state: dict | None


class Position:
    """A data stream's checkpoint state, as `pipeline.Stream` gives it."""

    def __init__(self, batch: int = 0):
        self.batch = batch

    def get_state(self) -> bytes:
        return json.dumps({"next_batch": self.batch}).encode()

    def set_state(self, state: bytes) -> None:
        self.batch = json.loads(state)["next_batch"]


def _train_state(step):
    # Random bytes: incompressible, so the files hold them verbatim (see _flip).
    rng = np.random.default_rng(step)
    values = [rng.integers(0, 256, 4096, dtype=np.uint8).view(np.float32) for _ in range(2)]
    return TrainState(jnp.asarray(step, jnp.int32), {"w": jnp.asarray(values[0])},
                      {"mu": jnp.asarray(values[1])})


TRAIN_ABSTRACT = jax.eval_shape(lambda: _train_state(0))


def _saved_run(directory, steps=(2, 4)):
    """Checkpoints of a run evaluated at every step (the newest scoring best), with the data
    stream's position (the step)."""
    ckpt = checkpoint.Checkpoints(directory, keep=10)
    for s in steps:
        ckpt.save(s, _train_state(s), Position(s), metrics={"score": s / 10})
    ckpt.wait()
    ckpt.close()


def _flip(step_dir, values):
    """Flips 64 bytes of `values` in the checkpoint file that holds them, as a disk or a
    copy might."""
    needle = np.asarray(values).tobytes()[:256]
    hits = [f for f in step_dir.rglob("*") if f.is_file() and needle in f.read_bytes()]
    assert hits, "the values are stored verbatim"
    for f in hits:
        data = bytearray(f.read_bytes())
        at = data.find(needle) + 64
        data[at:at + 64] = bytes(b ^ 0xFF for b in data[at:at + 64])
        f.write_bytes(bytes(data))


@pytest.mark.parametrize("part", ["params", "opt_state"])
def test_flipped_bytes_in_the_newest_checkpoint_fall_back_to_the_previous_one(tmp_path, part,
                                                                            caplog):
    _saved_run(tmp_path)
    _flip(tmp_path / "4", next(iter(getattr(_train_state(4), part).values())))
    ckpt = checkpoint.Checkpoints(tmp_path)
    position = Position()
    with caplog.at_level("WARNING"):
        step, state = ckpt.restore_latest(TRAIN_ABSTRACT, data=position)
    assert step == 2 and position.batch == 2
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(_train_state(2)), strict=True):
        np.testing.assert_array_equal(a, b)
    assert "checkpoint step 4" in caplog.text and "differ from the checksums" in caplog.text
    assert ckpt.steps() == [2] and (tmp_path / "corrupt-4").is_dir()
    ckpt.close()


def test_eval_refuses_a_corrupt_checkpoint_naming_it(tmp_path):
    _saved_run(tmp_path)
    _flip(tmp_path / "4", _train_state(4).params["w"])
    ckpt = checkpoint.Checkpoints(tmp_path, read_only=True)
    step = ckpt.resolve("best")
    assert step == 4
    # As state.restore_run reads it: the model's variables, not the optimizer state.
    with pytest.raises(checkpoint.CorruptCheckpointError) as error:
        ckpt.restore(step, TRAIN_ABSTRACT.replace(opt_state=None), partial=True)
    assert f"checkpoint {tmp_path / '4'} is corrupt" in str(error.value)
    assert "['w']" in str(error.value) and "\n" not in str(error.value)
    # A user error of the kind an incompatible checkpoint is.
    assert isinstance(error.value, checkpoint.IncompatibleCheckpointError)
    ckpt.restore(2, TRAIN_ABSTRACT.replace(opt_state=None), partial=True)  # the others do
    ckpt.close()
    assert ckpt.steps() == [2, 4]  # eval moves nothing


@pytest.mark.parametrize("item", ["data/metadata", "metrics/metrics", "checksums"])
@pytest.mark.parametrize("damage", ["emptied", "deleted"])
def test_a_damaged_data_stream_or_metrics_item_falls_back(tmp_path, item, damage, caplog):
    # The checksums themselves too: deleted, the step would otherwise restore unchecked.
    _saved_run(tmp_path)
    path = tmp_path / "4" / item
    if path.is_dir():
        (shutil.rmtree(path) if damage == "deleted"
         else [f.write_text("") for f in path.rglob("*") if f.is_file()])
    else:
        path.write_text("") if damage == "emptied" else path.unlink()
    ckpt = checkpoint.Checkpoints(tmp_path)
    position = Position()
    with caplog.at_level("WARNING"):
        step, _ = ckpt.restore_latest(TRAIN_ABSTRACT, data=position)
    assert step == 2 and position.batch == 2
    assert "checkpoint step 4" in caplog.text and "falling back" in caplog.text
    assert ckpt.steps() == [2] and (tmp_path / "corrupt-4").is_dir()
    ckpt.close()


def test_an_older_checkpoint_with_damaged_metrics_is_refused_as_best_and_set_aside(tmp_path):
    _saved_run(tmp_path, steps=(2, 4, 6))
    (tmp_path / "4" / "metrics" / "metrics").write_text("")  # was it the best? unknown
    with pytest.raises(checkpoint.CorruptCheckpointError, match="4 is corrupt: its metrics"):
        checkpoint.Checkpoints(tmp_path, read_only=True).resolve("best")
    ckpt = checkpoint.Checkpoints(tmp_path)
    assert ckpt.restore_latest(TRAIN_ABSTRACT)[0] == 6
    # Set aside rather than deleted by Orbax as an unranked checkpoint.
    assert ckpt.steps() == [2, 6] and (tmp_path / "corrupt-4").is_dir()
    assert ckpt.resolve("best") == 6
    ckpt.close()


def test_a_read_only_restore_warns_of_nothing(tmp_path, caplog):
    _saved_run(tmp_path)
    with caplog.at_level("WARNING"):  # Orbax's read-only mode: "Given directory is read only"
        ckpt = checkpoint.Checkpoints(tmp_path, read_only=True)
        ckpt.restore(ckpt.resolve("best"), TRAIN_ABSTRACT)
    assert not caplog.records
    with pytest.raises(RuntimeError, match="read-only"):
        ckpt.save(6, _train_state(6))
    ckpt.close()
    assert checkpoint.Checkpoints(tmp_path).steps() == [2, 4]


def test_a_damaged_tensorstore_index_is_a_corrupt_checkpoint(tmp_path):
    # Bytes flipped in TensorStore's b-tree nodes fail its own CRC (DATA_LOSS) before ours.
    _saved_run(tmp_path)
    for f in (tmp_path / "4" / "state").rglob("d/*"):
        data = bytearray(f.read_bytes())
        data[len(data) // 3:len(data) // 3 + 64] = bytes(64)
        f.write_bytes(bytes(data))
    ckpt = checkpoint.Checkpoints(tmp_path, read_only=True)
    with pytest.raises(checkpoint.CorruptCheckpointError,
                       match=r"4 is corrupt: TensorStore cannot read it \(DATA_LOSS in .*/d/"):
        ckpt.restore(4, TRAIN_ABSTRACT)
    ckpt.close()
