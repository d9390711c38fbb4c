"""`load(path)`: a predictor for notebooks and scripts, from a training workdir (its best, or
latest, checkpoint) or from a converted folder (`python -m abaw_jax.convert <family>`).

    from abaw_jax import inference
    predict = inference.load("workdirs/va")
    out = predict(faces)          # faces: uint8 RGB (N, H, W, 3), any H, W
    out["va"]                     # (N, 2) valence, arousal in [-1, 1]
    out = predict(faces, embedding=True)   # + the model's other outputs ("embedding", ...)

A converted folder without a classifier (DDAMFN converted without `--keep_fc`) has no task
output: its predictor returns the model's other outputs ("embedding", ...), with a warning at
load saying so.

A temporal (clip) model takes the N faces as one clip (consecutive frames of one video, in
order) and gives per-frame outputs. A model that takes more named inputs gets them as keyword
arrays, e.g. `predict(faces, features=vectors)` with one row per face.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import numpy as np
from absl import logging
from flax import nnx

from abaw_jax import convert, heads, metrics, models, parallel, postprocess, tasks
from abaw_jax import state as state_lib
from abaw_jax.data import augment
from abaw_jax.errors import NotFoundError


class Predictor:
    """Applies the model's own preprocessing (resize, normalisation) and returns numpy.

    Outputs per task head: VA in [-1, 1], EXPR class probabilities, AU probabilities; for a
    converted model kept with its classifier (DDAMFN `--keep_fc`), the raw `logits`. A model
    with no task output returns its other outputs (the embedding, ...) as `embedding=True`
    does. A multi-branch model (GCSA's audio-visual) also returns each branch's `<head>.<branch>`
    and its head fused with the weights searched on validation (`fuse`: `Post.fuse`).
    """

    def __init__(self, model: nnx.Module, family: models.Family, inputs: tuple[str, ...],
                 head_fn: Callable[[dict], dict], thresholds: np.ndarray | None = None,
                 fuse: Callable[[dict], dict] | None = None):
        model.eval()
        self.inputs, self.thresholds, self.returns = inputs, thresholds, family.returns
        self.fuse = fuse
        self.preprocess = family.image_preprocess(model)
        graphdef, state = nnx.split(model)
        clips = family.clips

        @jax.jit
        def forward(state, batch):
            model = nnx.merge(graphdef, state)
            if clips:  # the N frames as one clip
                batch = {k: v[None] for k, v in batch.items()}
            out = model(models.prepare_inputs(self.preprocess, batch, inputs))
            out.pop("losses", None)
            if clips:
                out = jax.tree.map(lambda v: v[0], out)
            return head_fn(out), out

        self._state, self._forward = state, forward

    def __call__(self, images: np.ndarray | None = None, embedding: bool = False,
                 **named: np.ndarray) -> dict[str, np.ndarray]:
        batch = {k: np.asarray(v, np.float32) for k, v in named.items()}
        missing = [k for k in self.inputs if k not in (*batch, "image", "frame_mask")]
        if missing:
            raise ValueError(f"this model also takes {missing} (keyword arrays, a row per face)")
        if "image" in self.inputs:
            images = np.asarray(images)
            if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
                raise ValueError(f"expected uint8 RGB images (N, H, W, 3), got {images.dtype} "
                                 f"{images.shape}")
            size = self.preprocess.size
            batch["image"] = np.stack([augment.resize(im, size) for im in images])
        n = len(next(iter(batch.values())))
        batch["index"] = np.arange(n, dtype=np.int32)  # every frame real (frame_mask)
        heads, extra = jax.device_get(self._forward(self._state, batch))
        out = {k: np.asarray(v) for k, v in heads.items()}
        if self.fuse:
            out = {k: np.asarray(v, np.float32) for k, v in self.fuse(out).items()}
        out.update({k: np.asarray(extra[k]) for k in self.returns if k in extra})
        # The model's other outputs: embeddings, DDAMFN's maps and heads; all there is of a
        # model without task outputs.
        if embedding or not out:
            out.update({k: jax.tree.map(np.asarray, v) for k, v in extra.items()
                        if k not in out})
        return out


def load(path: str | Path, which: str = "best") -> Predictor:
    """A predictor for a training workdir ('best' or 'latest' checkpoint, or a step) or for a
    converted folder."""
    path = Path(path)
    if (path / "config.json").is_file() and (path / "checkpoints").is_dir():
        return _from_workdir(path, which)
    if (path / convert.META_FILE).is_file() and (path / convert.STATE_DIR).is_dir():
        return _from_converted(path)
    raise NotFoundError(f"{path}: neither a training workdir (config.json + checkpoints/) "
                        f"nor a converted folder ({convert.META_FILE} + "
                        f"{convert.STATE_DIR}/)")


def _from_workdir(workdir: Path, which: str) -> Predictor:
    config = state_lib.read_config(workdir)
    mesh = parallel.make_mesh(jax.local_devices()[:1])
    restored = state_lib.restore_run(config, workdir, which, mesh)
    setup = restored.setup
    thresholds = restored.metrics.get("au/thresholds")
    model = setup.model(restored.state)
    post = postprocess.Post.from_metrics(restored.metrics, setup.task.heads)
    return Predictor(model, setup.family, setup.inputs, setup.task.predict,
                     None if thresholds is None else metrics.au_values(thresholds), post.fuse)


def _from_converted(directory: Path) -> Predictor:
    meta = convert.read_meta(directory)
    family = models.get(meta["model"])
    kwargs = meta.get("model_kwargs", {"num_head": meta.get("num_head", 2)})
    model = family.build(outputs=meta["outputs"] or {}, rngs=nnx.Rngs(0), feature_dim=0,
                         **kwargs)
    family.load_into(model, directory)
    names = tuple(meta["outputs"] or {})
    if not names:
        logging.warning(
            "%s holds no task output (converted without its classifier, e.g. DDAMFN without "
            "--keep_fc): the predictor returns the model's embedding and its other outputs "
            "instead; convert with --keep_fc for the classifier's logits, or train task layers "
            "from it with --config.init_from", directory)
    return Predictor(model, family, tuple(model.inputs), _pick(names))


def _pick(names: tuple[str, ...]) -> Callable[[Mapping], dict]:
    """The converted model's outputs: a task head's as the task predicts it (EXPR class
    probabilities from CLIP's prompt similarities), others raw (DDAMFN's `logits`)."""
    task = tasks.Task("converted", tuple(n for n in names if n in heads.HEADS), "")
    return lambda out: {**{k: out[k] for k in names}, **task.predict(out)}
