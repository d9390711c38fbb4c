"""`--mode=extract`: a run's frame model (its family's `embed`) run once over every split, its
per-frame embeddings stored in `<workdir>/features/` (data/features.py), so that heads train
from them in minutes (`--config.data.features=<workdir>/features`). A face model embeds each
frame's image; an audio network (configs/gcsa/audio.py) each frame's sound window.

The model is the workdir's checkpoint, or with no checkpoint the converted weights of
`config.init_from`. The folder records which, and a run training from it in place of images
starts with that same backbone (`state.load_backbone`), so its checkpoints evaluate and predict
end to end as well as from the cache.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging

from abaw_jax import checkpoint, parallel
from abaw_jax import state as state_lib
from abaw_jax.data import affwild2, audio, cache, features, pipeline, records
from abaw_jax.errors import ConfigError, NotFoundError
from abaw_jax.evaluators import split


def _source_state(config: ml_collections.ConfigDict, workdir: Path, which: str
                  ) -> tuple[state_lib.Setup, state_lib.TrainState, dict]:
    """(setup, state, provenance) of the extracting model."""
    try:
        run = state_lib.restore_run(config, workdir, which)
        return run.setup, run.state, {"workdir": str(workdir.absolute()), "step": run.step}
    except checkpoint.NoCheckpointError:
        pass  # extract from the converted weights of init_from
    if not config.init_from:
        raise NotFoundError(f"{workdir}: no checkpoint to extract features with, and no "
                            "config.init_from")
    setup = state_lib.make_setup(config, parallel.make_mesh())
    state = state_lib.load_pretrained(state_lib.init_state(config, setup), setup,
                                      config.init_from)
    return setup, state, {"init_from": str(Path(config.init_from).absolute())}


def _splits(config: ml_collections.ConfigDict) -> list[tuple[str, Path]]:
    """(split, records folder): train, eval and, when the data has a test list, test."""
    data = cache.records_for(config.data, config.task)
    splits = [(config.data.train_split, data), (config.data.eval_split, data)]
    try:
        splits.append(("test", cache.records_for(config.data, config.task, test=True)))
    except affwild2.DataError as e:  # no test list in this data: train/validation only
        logging.warning("no test split to extract (%s)", e)
    return splits


AUTO = "auto"


def resolve_features(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`data.features=auto`: the embeddings of `init_from`'s frame model (its converted
    weights: CLIP's frozen tower) over the run's records, extracted into the data cache the
    first time and read from there after (`$ABAW_JAX_CACHE/features-<key>/features`, keyed by
    the weights folder's files, the records and the model). Other configs come back as they
    are; the returned config names the folder, so a workdir's config.json does too."""
    if config.data.get("features") != AUTO:
        return config
    if not config.init_from:
        raise ConfigError("data.features=auto extracts with the converted weights of init_from: "
                          "set init_from, or data.features to --mode=extract outputs")
    frame = copy.deepcopy(config)
    frame.data.features = None
    weights = Path(config.init_from)
    files = sorted((str(f.relative_to(weights)), f.stat().st_size, f.stat().st_mtime_ns)
                   for f in weights.rglob("*") if f.is_file())
    home = cache.cache_dir() / "features-{}".format(cache.content_key({
        "weights": files, "records": str(cache.records_for(config.data, config.task)),
        "model": config.model.to_dict(), "task": config.task}))
    if not (home / "features" / features.META_FILE).is_file():
        logging.info("extracting the frame embeddings of %s once into %s (data.features=auto)",
                     weights, home)
        run(frame, home)
    resolved = copy.deepcopy(config)
    resolved.data.features = str(home / "features")
    return resolved


def run(config: ml_collections.ConfigDict, workdir: str | Path, which: str = "latest") -> Path:
    """Writes the embeddings of the train, eval and (when the data has one) test splits."""
    workdir = Path(workdir)
    state_lib.check_workdir(config, workdir)
    setup, state, source = _source_state(config, workdir, which)
    names = state_lib.embed_inputs(setup)
    if not names or not setup.family.embeds:
        raise ConfigError(f"model {config.model.name!r} has no frame model to extract with")
    embed = state_lib.bind(state_lib.embed_fn(setup), state)
    out = workdir / "features"
    size = setup.preprocess.size if "image" in names else 0
    sound = audio.AudioConfig.from_config(config.data.get("audio")) if "audio" in names else None
    sizes = {}
    for name, data_dir in _splits(config):
        result = split.predict_split(
            embed, data_dir, name, batch_size=config.eval_batch_size, mesh=setup.mesh,
            loader=pipeline.Loader.from_config(config.data.loader), size=size, audio=sound)
        write = functools.partial(features.write_split, out, name,
                                  result["preds"]["embedding"], result["labels"],
                                  *records.read_frame_index(data_dir, name))
        parallel.on_process_0(write, f"writing the {name} features")
        sizes[name] = len(result["preds"]["embedding"])
        logging.info("extracted %d %s frames into %s", sizes[name], name, out / name)
    # The padding frame's embedding: of an all-zero image, or of silence.
    pad_inputs = {"image": np.zeros((1, size, size, 3), np.uint8)} if size else \
        {"audio": audio.silence(sound)[None]}
    pad = embed(pad_inputs)["embedding"]
    parallel.on_process_0(lambda: features.write_meta(
        out, {"source": source, "model": config.model.name, "task": config.task,
              "inputs": list(names), "splits": sizes}, np.asarray(jax.device_get(pad))[0]),
        "writing the features' metadata")
    return out
