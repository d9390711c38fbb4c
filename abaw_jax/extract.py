"""`--mode=extract`: the frozen backbone run once over every split, its per-frame embeddings
stored in `<workdir>/features/` (data/features.py), so that a temporal head trains from them in
minutes (`--config.data.features=<workdir>/features`).

The backbone is the workdir's checkpoint (a frame DDAMFN or a DDAMFN+LSTM run), or with no
checkpoint the converted weights of `config.init_from`. The folder records which, and a run
training from it starts with that same backbone (`load_backbone`), so its checkpoints evaluate
and predict end to end as well as from the cache.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from abaw_jax import checkpoint, evaluate, parallel
from abaw_jax.data import cache, features, pipeline, records


def _backbone(model: nnx.Module) -> nnx.Module:
    return getattr(model, "backbone", model)


def _source_state(config, workdir: Path, which: str):
    """(setup, state, provenance) of the extracting model."""
    from abaw_jax import train

    try:
        run = train.restore_run(config, workdir, which)
        return run.setup, run.state, {"workdir": str(workdir.absolute()), "step": run.step}
    except checkpoint.NoCheckpointError:
        pass  # extract from the converted weights of init_from
    if not config.init_from:
        raise FileNotFoundError(f"{workdir}: no checkpoint to extract features with, and no "
                                "config.init_from")
    setup = train.make_setup(config, parallel.make_mesh())
    state = train.load_pretrained(train.init_state(config, setup), setup, config.init_from)
    return setup, state, {"init_from": str(Path(config.init_from).absolute())}


def run(config: ml_collections.ConfigDict, workdir: str | Path, which: str = "latest") -> Path:
    """Writes the embeddings of the train, eval and (when the data has one) test splits."""
    from abaw_jax import train

    workdir = Path(workdir)
    train.check_workdir(config, workdir)
    setup, state, source = _source_state(config, workdir, which)

    def embed(params, rest, images):
        model = nnx.merge(setup.eval_graphdef, params, rest)
        return {"embedding": _backbone(model)(train.normalize(images))["embedding"]}

    out = workdir / "features"
    sizes = {}
    splits = [(config.data.train_split, cache.records_for(config.data, config.task)),
              (config.data.eval_split, cache.records_for(config.data, config.task))]
    try:
        splits.append(("test", cache.records_for(config.data, config.task, test=True)))
    except Exception as e:  # noqa: BLE001 - no test list in this data: train/validation only
        logging.warning("no test split to extract (%s)", e)
    step = jax.jit(embed)
    for split, data_dir in splits:
        result = evaluate.predict_split(
            step, state.params, state.rest, data_dir, split, batch_size=config.eval_batch_size,
            image_size=setup.image_size, mesh=setup.mesh,
            loader=pipeline.Loader.from_config(config.data.loader))
        write = functools.partial(features.write_split, out, split,
                                  result["preds"]["embedding"], result["labels"],
                                  *records.read_frame_index(data_dir, split))
        parallel.on_process_0(write, f"writing the {split} features")
        sizes[split] = len(result["preds"]["embedding"])
        logging.info("extracted %d %s frames into %s", sizes[split], split, out / split)
    size = setup.image_size
    pad = step(state.params, state.rest, np.zeros((1, size, size, 3), np.uint8))["embedding"]
    parallel.on_process_0(lambda: features.write_meta(
        out, {"source": source, "model": config.model.name, "task": config.task,
              "splits": sizes}, np.asarray(pad)[0]), "writing the features' metadata")
    return out


def load_backbone(state, setup, features_dir: str | Path):
    """`state` with the backbone (parameters and BatchNorm statistics) that extracted
    `features_dir`; the temporal layers and task layers keep their initialisation."""
    from abaw_jax import train

    meta = json.loads((Path(features_dir) / "meta.json").read_text())
    source = meta["source"]
    if "init_from" in source:
        return train.load_pretrained(state, setup, source["init_from"])
    workdir = Path(source["workdir"])
    src_config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    src_state = train.restore_run(src_config, workdir, source["step"]).state
    params, rest = nnx.to_pure_dict(state.params), nnx.to_pure_dict(state.rest)
    for target, src in ((params, src_state.params), (rest, src_state.rest)):
        src = nnx.to_pure_dict(src)
        src = src.get("backbone", src)
        target["backbone"].update({k: v for k, v in src.items() if k != "tasks"})
    new_params, new_rest = state.params, state.rest
    nnx.replace_by_pure_dict(new_params, params)
    nnx.replace_by_pure_dict(new_rest, rest)
    sharding = parallel.replicated(setup.mesh)
    new_params, new_rest = jax.device_put((new_params, new_rest), sharding)
    opt_state = jax.jit(setup.tx.init, out_shardings=sharding)(new_params)
    return state.replace(params=new_params, rest=new_rest, opt_state=opt_state)
