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
order) and gives per-frame outputs; `valid=` (N,) bool marks padding frames of a clip (False),
as evaluation pads clips; `predict.clip_batch(images)` takes C clips at once, (C, T, H, W, 3).
A model that takes more named inputs gets them as keyword arrays, e.g.
`predict(faces, features=vectors)` with one row per face; inputs a model takes optionally
(`optional_inputs`: MAE's masking `noise`) likewise. Float images (N, 3, S, S) are taken as
already normalised (a PyTorch pipeline's tensors) at the model's size. A model that draws
randomness at inference (MAE's masking without `noise`) gets a fresh key per model call, from
`load(..., seed=)`.

Each model call runs `predict.batch` examples (faces, or clips of a clip model: 32 and 1 by
default) on each device, the last call of a batch padded: a face's (a clip's) outputs are the
same, bit for bit, however many others a call holds, where it sits among them and over how many
devices (see `Predictor`; randomness a model draws per call aside; tested on CPU).
`predict.sharded(devices, batch)` is the same predictor on the first `devices` local devices
(the "data" mesh of `parallel`; 0: all), with `batch` examples on each (0: as before): a call's
examples are split over them.

`predict.heads` names its task heads (of "va", "expr", "au"), `predict.post` is the
post-processing stored with the checkpoint (per-head smoothing along a video, then AU
thresholds; none for a converted folder) and `predict.feed` what the run fed the model (clip
length and stride, the audio windows' `AudioConfig`): what a caller running the model over a
video (`abaw_jax.video`) applies around it.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import numpy as np
from absl import logging
from flax import nnx

from abaw_jax import convert, heads, metrics, models, parallel, postprocess, tasks
from abaw_jax import state as state_lib
from abaw_jax.data import audio, augment
from abaw_jax.data import features as features_lib
from abaw_jax.errors import ConfigError, NotFoundError

# Examples per device in a model call (`Predictor.batch`): a frame model's faces, a clip
# model's clips.
FRAMES_PER_DEVICE = 32
CLIPS_PER_DEVICE = 1


class Predictor:
    """Applies the model's own preprocessing (resize, normalisation) and returns numpy.

    Outputs per task head: VA in [-1, 1], EXPR class probabilities, AU probabilities; for a
    converted model kept with its classifier (DDAMFN `--keep_fc`), the raw `logits`. A model
    with no task output returns its other outputs (the embedding, ...) as `embedding=True`
    does. A multi-branch model (GCSA's audio-visual one) also returns each branch's
    `<head>.<branch>` and its head fused with the weights searched on validation (`post`:
    `Post.fuse`).

    Every model call runs one compiled shape: `batch` examples (faces; clips of a clip model)
    on each device. A call's examples are cut into such calls, the last padded (with examples
    of index -1, masked as a clip's padding frames are, their outputs dropped). So an example's
    outputs do not depend on how many others a call holds, where it sits among them, or how
    many devices share the work: XLA's kernels sum in an order that follows the batch's shape,
    and outputs of one example at two batch sizes differed in their last bits (by 3.7e-3 once
    magnified by a test's task layers, on a CPU without AVX-512).
    """

    def __init__(self, model: nnx.Module, family: models.Family, inputs: tuple[str, ...],
                 head_fn: Callable[[dict], dict], thresholds: np.ndarray | None = None,
                 post: postprocess.Post | None = None, feed: state_lib.Feed | None = None,
                 heads: tuple[str, ...] | None = None, seed: int = 0, batch: int = 0):
        model.eval()
        self.heads = heads  # the task heads among its outputs (None: not said)
        self.inputs, self.thresholds, self.returns = inputs, thresholds, family.returns
        self.optional = tuple(getattr(model, "optional_inputs", ()))
        self.clips = family.clips  # an example is a clip (T frames), else a frame
        _check_batch(batch)
        self.batch = batch or (CLIPS_PER_DEVICE if self.clips else FRAMES_PER_DEVICE)
        self.preprocess = family.image_preprocess(model)
        self.post = post or postprocess.Post({})
        self.feed = feed or _default_feed(self.preprocess, inputs)
        self.mesh: jax.sharding.Mesh | None = None  # None: jax's default device
        graphdef, state = nnx.split(model)

        @functools.partial(jax.jit, static_argnames="normalised")
        def forward(state, batch, key, normalised):
            model = nnx.merge(graphdef, state)
            # "frame_mask" comes from "index", which every call holds
            names = (*inputs, *(k for k in self.optional if k in batch or k == "frame_mask"))
            x = models.prepare_inputs(self.preprocess, batch,
                                      tuple(k for k in names if k != "image" or not normalised))
            if normalised:
                x["image"] = batch["image"]
            out = model(x, rngs=nnx.Rngs(key))
            out.pop("losses", None)
            return head_fn(out), out

        @functools.partial(jax.jit, static_argnames="normalised")
        def embed(state, batch, normalised):
            model = nnx.merge(graphdef, state)
            x = models.prepare_inputs(self.preprocess, batch, () if normalised else ("image",))
            if normalised:
                x["image"] = batch["image"]
            return family.embed_frames(model, x)

        self._state, self._forward, self._key = state, forward, jax.random.key(seed)
        self._embed = embed if family.embeds and "image" in inputs else None

    def _images(self, images: np.ndarray) -> tuple[np.ndarray, bool]:
        """(NHWC images for the model, whether they are already normalised)."""
        images = np.asarray(images)
        size = self.preprocess.size
        if images.ndim == 4 and images.shape[1] == 3 and np.issubdtype(images.dtype,
                                                                        np.floating):
            if images.shape[2:] != (size, size):
                raise ValueError(f"normalised float images (N, 3, H, W) must be at the model's "
                                 f"size {size}x{size}, got {images.shape}")
            return images.transpose(0, 2, 3, 1).astype(np.float32), True
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 RGB images (N, H, W, 3) or normalised float "
                             f"(N, 3, {size}, {size}), got {images.dtype} {images.shape}")
        return np.stack([augment.resize(im, size) for im in images]), False

    def sharded(self, devices: int = 0, batch: int = 0) -> Predictor:
        """This predictor (its compiled function shared) with its variables replicated on the
        first `devices` local devices (0: all), every call's examples split over them, `batch`
        of them on each device (0: this predictor's); itself when it is already so."""
        local = jax.local_devices()
        if devices > len(local):
            raise ConfigError(f"devices={devices}: this process has {len(local)} local devices")
        _check_batch(batch)
        mesh = parallel.make_mesh(local[:devices or None])
        batch = batch or self.batch
        if self.mesh is not None and self.mesh.devices.tolist() == mesh.devices.tolist() \
                and batch == self.batch:
            return self
        out = copy.copy(self)
        out.mesh, out.batch = mesh, batch
        out._state = jax.device_put(self._state, parallel.replicated(mesh))
        return out

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Each face's embedding (N, D), as `--mode=extract` stores it in a feature cache."""
        if self._embed is None:
            raise ConfigError("this model has no frame embedding (`--mode=extract` cannot run "
                              "it either)")
        batch = {}
        batch["image"], normalised = self._images(images)
        batch["index"] = np.arange(len(batch["image"]), dtype=np.int32)
        return self._per_call(lambda b: self._embed(self._state, b, normalised), batch,
                              self._frames_per_call())

    def __call__(self, images: np.ndarray | None = None, embedding: bool = False,
                 valid: np.ndarray | None = None, **named: np.ndarray) -> dict[str, np.ndarray]:
        """The outputs of N faces (N, H, W, 3); of a clip model, of one clip of N frames.
        `valid` (N,) False: a padding frame of a clip."""
        if not self.clips:
            return self._predict(images, embedding, valid, named)
        out = self.clip_batch(_one_clip(images), embedding, _one_clip(valid),
                              **{k: _one_clip(v) for k, v in named.items()})
        return jax.tree.map(lambda v: v[0], out)

    def clip_batch(self, images: np.ndarray | None = None, embedding: bool = False,
                   valid: np.ndarray | None = None, **named: np.ndarray
                   ) -> dict[str, np.ndarray]:
        """A clip model's outputs of C clips of T frames each: images (C, T, H, W, 3), named
        inputs (C, T, ...), `valid` (C, T); outputs (C, T, ...)."""
        if not self.clips:
            raise ConfigError("clip_batch: this model takes frames, not clips")
        shape = None
        if images is not None:
            images = np.asarray(images)
            shape, images = images.shape[:2], images.reshape(-1, *images.shape[2:])
        return self._predict(images, embedding, valid, named, shape)

    def _predict(self, images, embedding, valid, named, clip_shape=None
                 ) -> dict[str, np.ndarray]:
        batch = {k: np.asarray(v, np.float32) for k, v in named.items()}
        missing = [k for k in self.inputs if k not in (*batch, "image", "frame_mask")]
        if missing:
            raise ValueError(f"this model also takes {missing} (keyword arrays, a row per face)")
        normalised = False
        if "image" in self.inputs:
            batch["image"], normalised = self._images(images)
            if clip_shape is not None:
                batch["image"] = batch["image"].reshape(*clip_shape,
                                                        *batch["image"].shape[1:])
        shape = next(iter(batch.values())).shape[:2 if self.clips else 1]
        # every frame real (frame_mask) but padding
        batch["index"] = np.arange(np.prod(shape), dtype=np.int32).reshape(shape)
        if valid is not None:
            batch["index"] = np.where(np.asarray(valid, bool), batch["index"], -1)

        def call(part):
            self._key, key = jax.random.split(self._key)
            return self._forward(self._state, part, key, normalised)

        heads, extra = self._per_call(call, batch, self.per_call)
        out = {k: np.asarray(v) for k, v in heads.items()}
        if self.post.fusion:
            out = {k: np.asarray(v, np.float32) for k, v in self.post.fuse(out).items()}
        out.update({k: np.asarray(extra[k]) for k in self.returns if k in extra})
        # The model's other outputs: embeddings, DDAMFN's maps and heads; all there is of a
        # model without task outputs.
        if embedding or not out:
            out.update({k: jax.tree.map(np.asarray, v) for k, v in extra.items()
                        if k not in out})
        return out

    def _devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    @property
    def per_call(self) -> int:
        """Examples (faces, or clips) a model call holds: `batch` on each device."""
        return self.batch * self._devices()

    def _frames_per_call(self) -> int:
        """Frames a model call holds: a clip model's backbone runs its `batch` clips' frames."""
        return self.per_call * (max(self.feed.clip_length, 1) if self.clips else 1)

    def _per_call(self, fn: Callable, batch: dict[str, np.ndarray], size: int):
        """`fn` over the examples (rows) of `batch`, `size` per call: each call's rows padded to
        `size` (index -1) and split over the mesh; the outputs' rows concatenated, the
        padding's cut."""
        n = len(batch["index"])
        outs, counts = [], []
        for start in range(0, max(n, 1), size):
            part = {k: v[start:start + size] for k, v in batch.items()}
            pad = size - len(part["index"])
            counts.append(size - pad)
            if pad:
                part = {k: np.concatenate([v, np.full((pad, *v.shape[1:]), -1 if k == "index"
                                                      else 0, v.dtype)])
                        for k, v in part.items()}
            part = parallel.to_global(part, self.mesh) if self.mesh is not None else part
            outs.append(fn(part))  # every call dispatched before the first result is read
        return jax.tree.map(lambda *v: _rows(v, size, n, counts), *jax.device_get(outs))


def _check_batch(batch: int) -> None:
    if batch < 0:
        raise ConfigError(f"batch={batch}: examples per device must be >= 1 (0: the default)")


def _one_clip(v: np.ndarray | None) -> np.ndarray | None:
    """A clip's array as a batch of one clip."""
    return None if v is None else np.asarray(v)[None]


def _rows(parts: tuple[np.ndarray, ...], size: int, n: int, counts: list[int]) -> np.ndarray:
    """One output over every call: its rows (the first `n`) when it has a row per example;
    a scalar (MAE's loss over the call's examples, its padding uncounted) as the calls' mean
    weighted by their examples."""
    if np.ndim(parts[0]) and len(parts[0]) == size:
        return np.concatenate(parts)[:n]
    if np.ndim(parts[0]):
        raise ValueError(f"an output of shape {np.shape(parts[0])} has neither a row per "
                         f"example ({size}) nor one value")
    return np.asarray(np.average(parts, weights=counts) if sum(counts) else parts[0],
                      np.asarray(parts[0]).dtype)


class Stacked:
    """A head over cached `features` (a temporal head, the MAE fusion) run from faces: each
    face's embedding by its frame model (`Predictor.embed`, what `--mode=extract` cached) takes
    the cache's place. It takes what the head takes, with "image" for "features"; everything
    else (heads, post-processing, feed, clips, batch) is the head's."""

    def __init__(self, backbone: Predictor, head: Predictor):
        if "features" not in head.inputs:
            raise ConfigError(f"a backbone feeds a head's cached `features`; this model takes "
                              f"{list(head.inputs)}")
        self.backbone, self.head = backbone, head
        self.inputs = tuple(dict.fromkeys("image" if k == "features" else k
                                          for k in head.inputs))
        self.preprocess = backbone.preprocess
        self.heads, self.post, self.feed = head.heads, head.post, head.feed
        self.clips, self.batch, self.mesh = head.clips, head.batch, head.mesh
        self.per_call = head.per_call
        self.thresholds, self.returns = head.thresholds, head.returns

    def sharded(self, devices: int = 0, batch: int = 0) -> Stacked:
        return Stacked(self.backbone.sharded(devices), self.head.sharded(devices, batch))

    def embed(self, images: np.ndarray) -> np.ndarray:
        return self.backbone.embed(images)

    def __call__(self, images: np.ndarray | None = None, embedding: bool = False,
                 valid: np.ndarray | None = None, **named: np.ndarray) -> dict[str, np.ndarray]:
        return self.head(None, embedding, valid, features=self._features(images), **named)

    def clip_batch(self, images: np.ndarray | None = None, embedding: bool = False,
                   valid: np.ndarray | None = None, **named: np.ndarray
                   ) -> dict[str, np.ndarray]:
        images = np.asarray(images)
        features = self._features(images.reshape(-1, *images.shape[2:]))
        return self.head.clip_batch(None, embedding, valid, **named,
                                    features=features.reshape(*images.shape[:2], -1))

    def _features(self, images: np.ndarray) -> np.ndarray:
        features = self.backbone.embed(images)
        caches = self.head.feed.features
        width = features_lib.width(caches) if caches else features.shape[-1]
        if features.shape[-1] != width:
            raise ConfigError(f"the backbone's embeddings are {features.shape[-1]} wide; the "
                              f"head read {width}-wide cached features ({', '.join(caches)}): "
                              "a backbone stands for one cache, that of its own run")
        return features


def load(path: str | Path, which: str = "best", seed: int = 0) -> Predictor:
    """A predictor for a training workdir ('best' or 'latest' checkpoint, or a step) or for a
    converted folder; `seed` starts the keys of models that draw randomness (MAE's masking)."""
    path = Path(path)
    if state_lib.is_workdir(path):
        return _from_workdir(path, which, seed)
    if (path / convert.META_FILE).is_file() and (path / convert.STATE_DIR).is_dir():
        return _from_converted(path, seed)
    raise NotFoundError(f"{path}: neither a training workdir (config.json + checkpoints/) "
                        f"nor a converted folder ({convert.META_FILE} + "
                        f"{convert.STATE_DIR}/)")


def _from_workdir(workdir: Path, which: str, seed: int) -> Predictor:
    config = state_lib.read_config(workdir)
    mesh = parallel.make_mesh(jax.local_devices()[:1])
    restored = state_lib.restore_run(config, workdir, which, mesh)
    setup = restored.setup
    thresholds = restored.metrics.get("au/thresholds")
    model = setup.model(restored.state)
    # A label-free run (MAE pretraining) has no task head: its outputs are the model's own.
    head_names = setup.task.heads if setup.family.labels else ()
    post = postprocess.Post.from_metrics(restored.metrics, head_names)
    return Predictor(model, setup.family, setup.inputs,
                     setup.task.predict if setup.family.labels else _pick(()),
                     None if thresholds is None else metrics.au_values(thresholds), post,
                     setup.feed, head_names, seed=seed)


def _from_converted(directory: Path, seed: int) -> Predictor:
    meta = convert.read_meta(directory)
    family = models.get(meta["model"])
    kwargs = meta.get("model_kwargs", {"num_head": meta.get("num_head", 2)})

    def build():
        return family.build(outputs=meta["outputs"] or {}, rngs=nnx.Rngs(0), feature_dim=0,
                            **kwargs)

    # Built abstractly and filled from the folder: a concrete build compiles every initialiser
    # (16 of the 17 s that loading the tiny DDAMFN took on the busy 2-core machine).
    model = nnx.eval_shape(build)
    family.load_into(model, directory)
    if any(isinstance(v, jax.ShapeDtypeStruct) for v in jax.tree.leaves(nnx.state(model))):
        model = build()  # parts the folder does not hold keep their initial values
        family.load_into(model, directory)
    names = tuple(meta["outputs"] or {})
    if not names and not family.returns:
        logging.warning(
            "%s holds no task output (converted without its classifier, e.g. DDAMFN without "
            "--keep_fc): the predictor returns the model's embedding and its other outputs "
            "instead; convert with --keep_fc for the classifier's logits, or train task layers "
            "from it with --config.init_from", directory)
    return Predictor(model, family, tuple(model.inputs), _pick(names),
                     heads=tuple(n for n in names if n in heads.HEADS), seed=seed)


def _default_feed(preprocess: models.Preprocess | None, inputs: tuple[str, ...]
                  ) -> state_lib.Feed:
    """A converted model's inputs as a run of its family would feed them by default."""
    return state_lib.Feed(preprocess.size if preprocess and "image" in inputs else 0, (), 0, 1,
                          audio.AudioConfig() if "audio" in inputs else None)


def _pick(names: tuple[str, ...]) -> Callable[[Mapping], dict]:
    """The converted model's outputs: a task head's as the task predicts it (EXPR class
    probabilities from CLIP's prompt similarities; a branched model's, GCSA's audio-visual, from
    its branches), others raw (DDAMFN's `logits`)."""
    task = tasks.Task("converted", tuple(n for n in names if n in heads.HEADS), "")
    return lambda out: {**{k: out[k] for k in names if k in out}, **task.predict(out)}
