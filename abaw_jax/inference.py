"""`load(path)`: a predictor for notebooks and scripts, from a training workdir (its best, or
latest, checkpoint) or from a converted DDAMFN folder (`python -m abaw_jax.convert ddamfn`).

    from abaw_jax import inference
    predict = inference.load("workdirs/va")
    out = predict(faces)          # faces: uint8 RGB (N, H, W, 3), any H, W
    out["va"]                     # (N, 2) valence, arousal in [-1, 1]
    out = predict(faces, features=True)   # + "features" (N, 7, 7, 512) and "heads"

A DDAMFN+LSTM run takes the N faces as one clip (consecutive frames of one video, in order)
and gives per-frame outputs; with features=True its per-frame "embedding".
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx

from abaw_jax import parallel, tasks
from abaw_jax.data import augment


class Predictor:
    """Applies the model's own preprocessing (resize, ImageNet normalisation) and returns numpy.

    Outputs per task head: VA in [-1, 1], EXPR class probabilities, AU probabilities; for a
    converted DDAMFN kept with `--keep_fc`, the raw 8-class `logits`.
    """

    def __init__(self, model: nnx.Module, image_size: int, head_fn: Callable[[dict], dict],
                 thresholds: np.ndarray | None = None):
        model.eval()
        self.image_size, self.thresholds = image_size, thresholds
        graphdef, state = nnx.split(model)

        # A temporal (DDAMFN+LSTM) model takes the N images as one clip, in order.
        self.temporal = hasattr(model, "rnn")

        @jax.jit
        def forward(state, images):
            from abaw_jax.train import normalize

            model = nnx.merge(graphdef, state)
            if self.temporal:
                out = jax.tree.map(lambda v: v[0], model(normalize(images)[None]))
                return head_fn(out), {"embedding": out["embedding"], "heads": out["heads"]}
            out = model(normalize(images))
            return head_fn(out), {"features": out["features"], "heads": out["heads"]}

        self._state, self._forward = state, forward

    def __call__(self, images: np.ndarray, features: bool = False) -> dict[str, np.ndarray]:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 RGB images (N, H, W, 3), got {images.dtype} "
                             f"{images.shape}")
        batch = np.stack([augment.resize(im, self.image_size) for im in images])
        heads, extra = jax.device_get(self._forward(self._state, batch))
        out = {k: np.asarray(v) for k, v in heads.items()}
        if features:  # a temporal model gives its per-frame embeddings instead of maps
            out.update({k: np.asarray(v) for k, v in extra.items() if k != "heads"})
            out["heads"] = [np.asarray(h) for h in extra["heads"]]
        return out


def load(path: str | Path, which: str = "best") -> Predictor:
    """A predictor for a training workdir ('best' or 'latest' checkpoint, or a step) or for a
    converted DDAMFN folder."""
    path = Path(path)
    if (path / "config.json").is_file() and (path / "checkpoints").is_dir():
        return _from_workdir(path, which)
    if (path / "meta.json").is_file():
        return _from_converted(path)
    raise FileNotFoundError(f"{path}: neither a training workdir (config.json + checkpoints/) "
                            "nor a converted checkpoint (meta.json)")


def _from_workdir(workdir: Path, which: str) -> Predictor:
    from abaw_jax import train

    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    mesh = parallel.make_mesh(jax.local_devices()[:1])
    restored = train.restore_run(config, workdir, which, mesh)
    thresholds = restored.metrics.get("au/thresholds")
    model = nnx.merge(restored.setup.eval_graphdef, restored.state.params, restored.state.rest)
    task = tasks.get(config.task)
    return Predictor(model, config.image_size, task.predict,
                     None if thresholds is None else np.asarray(thresholds))


def _from_converted(directory: Path) -> Predictor:
    from abaw_jax import models
    from abaw_jax.convert import ddamfn as convert_ddamfn

    meta = convert_ddamfn.read_meta(directory)
    model = models.build(meta["model"], outputs=meta["outputs"] or {}, num_head=meta["num_head"])
    convert_ddamfn.load_into(model, directory)
    names = tuple(meta["outputs"] or {})
    return Predictor(model, 112, lambda out: {k: out[k] for k in names})
