"""The MAE pretraining objective (label-free): masked reconstruction of face crops.

The stream is every record of the splits in `data.pretrain_splits` shuffled together, labels
ignored (the records hold a task's curated frames: see configs/mae/pretrain.py for which),
augmented by `config.augment` (MAE's random resized crop and flip). The step minimises the
model's own loss (`mae.reconstruction_loss` over the removed patches, its masking noise
drawn from the step's key). Each evaluation reconstructs every frame of `data.eval_split` with
the same noise (drawn from `EVAL_NOISE_SEED` and the batch number), so evaluations compare, and
writes `reconstruction-<step>.png` (original / masked / reconstructed faces) to the workdir.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from abaw_jax import models, parallel, plots
from abaw_jax import state as state_lib
from abaw_jax.data import augment, pipeline
from abaw_jax.data import records as records_lib
from abaw_jax.errors import ConfigError
from abaw_jax.models import mae, vit

EVAL_NOISE_SEED = 1234  # the masking of every evaluation: the same patches removed each time
SHOWN = 4  # faces (rows) in each reconstruction figure


def _check(config: ml_collections.ConfigDict, setup: state_lib.Setup) -> None:
    if setup.family.labels or "image" not in setup.inputs:
        raise ConfigError(f"trainer mae_pretrain trains a label-free image model "
                          f"(model.name=mae_pretrain), not {config.model.name!r}")


def train_stream(config: ml_collections.ConfigDict, setup: state_lib.Setup, records: Path,
                 local_batch: int, shard: pipeline.Shard) -> pipeline.Stream:
    """The augmented face crops of every split of `data.pretrain_splits` (default: the train
    split), shuffled together."""
    _check(config, setup)
    splits = tuple(config.data.get("pretrain_splits") or (config.data.train_split,))
    augment_cfg = augment.AugmentConfig.from_config(config.augment, setup.feed.size)
    return pipeline.train_dataset(
        records, records_lib.whole_splits(records, splits), batch_size=local_batch,
        seed=config.seed, shard=shard, augment_cfg=augment_cfg,
        loader=pipeline.Loader.from_config(config.data.loader))


def train_step(config: ml_collections.ConfigDict, setup: state_lib.Setup, sharding,
               records: Path | None = None) -> Callable:
    """The jitted, donated step: (state, global batch) -> (state, logged scalars)."""
    dtype = jnp.dtype(config.compute_dtype)

    def step(state: state_lib.TrainState, batch: Mapping[str, jax.Array]):
        trained, frozen = setup.split_params(state.params)

        def loss_fn(trained):
            cast = jax.tree.map(lambda p: p.astype(dtype), (trained, frozen))
            model = nnx.merge(setup.graphdef, *cast, state.rest)
            inputs = models.prepare_inputs(setup.preprocess, batch, ("image",), dtype)
            out = model(inputs, rngs=nnx.Rngs(state.step_key()))
            return out["loss"].astype(jnp.float32)

        loss, grads = jax.value_and_grad(loss_fn)(trained)
        updates, opt_state = setup.tx.update(grads, state.opt_state, trained)
        params = nnx.merge_state(optax.apply_updates(trained, updates), frozen)
        stats = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                 "learning_rate": setup.schedule(state.step)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), stats

    return jax.jit(step, donate_argnums=0,
                   in_shardings=(sharding, parallel.batch_sharding(setup.mesh)),
                   out_shardings=(sharding, parallel.replicated(setup.mesh)))


def reconstruct_fn(setup: state_lib.Setup) -> Callable:
    """Jitted (params, rest, {"image", "mask"}, batch number) -> the squared-error sum and count
    over the removed patches of the real (mask True) frames, and the normalised images as
    given, masked and reconstructed (visible patches as given; `norm_pix_loss` predictions
    mapped back with each patch's mean and std)."""

    def run(params, rest, batch: Mapping[str, jax.Array], number: jax.Array) -> dict:
        model = nnx.merge(setup.eval_graphdef, params, rest)
        spec = model.spec
        images = models.prepare_inputs(setup.preprocess, batch, ("image",))["image"]
        key = jax.random.fold_in(jax.random.key(EVAL_NOISE_SEED), number)
        noise = jax.random.uniform(key, (images.shape[0], spec.num_patches))
        out = model({"image": images, "noise": noise})
        removed = out["mask"] * batch["mask"][:, None].astype(jnp.float32)
        count = removed.sum()
        loss = mae.reconstruction_loss(images, out["pred"], removed, spec.patch,
                                              spec.norm_pix_loss)
        target = vit.patchify(images, spec.patch)
        pred = out["pred"]
        if spec.norm_pix_loss:
            pred = pred * jnp.sqrt(target.var(-1, keepdims=True, ddof=1) + 1e-6) + \
                target.mean(-1, keepdims=True)
        kept = 1 - out["mask"][..., None]
        return {"sum": jnp.where(count > 0, loss * count, 0.0), "count": count,
                "masked": vit.unpatchify(target * kept, spec.patch),
                "reconstructed": vit.unpatchify(target * kept + pred * (1 - kept), spec.patch),
                "original": images}

    return jax.jit(run)


def evaluator(config: ml_collections.ConfigDict, setup: state_lib.Setup, records: Path,
              workdir: Path | None = None) -> Callable[[state_lib.TrainState], dict]:
    """state -> the mean squared error over the removed patches of every frame of the eval
    split ("reconstruction_loss"; "score" is its negative, for the best checkpoint), with a
    figure of the first faces in `workdir`."""
    run = reconstruct_fn(setup)
    local_batch = parallel.check_batch_size(config.eval_batch_size, setup.mesh)
    shard = pipeline.Shard(jax.process_index(), jax.process_count())

    def evaluate(state: state_lib.TrainState) -> dict:
        stream = pipeline.eval_dataset(records, config.data.eval_split, batch_size=local_batch,
                                       size=setup.feed.size, shard=shard,
                                       loader=pipeline.Loader.from_config(config.data.loader))
        total, count, shown = 0.0, 0.0, None
        try:
            for number, batch in enumerate(stream):
                inputs = parallel.to_global({k: batch[k] for k in ("image", "mask")},
                                            setup.mesh)
                out = run(state.params, state.rest, inputs, number)
                total += float(out["sum"])
                count += float(out["count"])
                if shown is None:
                    shown = parallel.to_host({k: out[k] for k in
                                              ("original", "masked", "reconstructed")})
        finally:
            stream.close()
        loss = total / max(count, 1.0)
        if workdir is not None and jax.process_index() == 0:
            _figure(setup, shown, Path(workdir), int(jax.device_get(state.step)), loss)
        return {"reconstruction_loss": loss, "score": -loss,
                "score_metric": "negative reconstruction_loss"}

    return evaluate


def _figure(setup: state_lib.Setup, shown: Mapping[str, np.ndarray], workdir: Path,
            step: int, loss: float) -> Path:
    pre = setup.preprocess
    mean, std = np.asarray(pre.mean, np.float32), np.asarray(pre.std, np.float32)
    faces = {k: v[:SHOWN] * std + mean for k, v in shown.items()}
    return plots.reconstructions(faces["original"], faces["masked"], faces["reconstructed"],
                                 workdir / f"reconstruction-{step}.png",
                                 f"step {step}: validation reconstruction loss {loss:.4f} "
                                 f"(the same masking at every evaluation)")
