r"""A transformer encoder head over clips (Conv1d projections, encoder layers with dropout,
per-frame task layers; padded frames are masked out of the attention), on DDAMFN per frame or
on cached per-frame features. The 6th ABAW MAE fusion system (this head on cached MAE features
joined with audio features, its paper settings) is configs/mae/fusion_*.py.

Synthetic Aff-Wild2, tiny DDAMFN end to end, a few minutes on a 2-core CPU:
  python -m abaw_jax.main --config=configs/transformer.py --workdir=workdirs/va_transformer
Another task: --config=configs/transformer.py:task=expr (arguments: real, task=).
On cached embeddings of a run (`--mode=extract`), the backbone frozen, or on several caches
joined per frame without a backbone:
  python -m abaw_jax.main --config=configs/transformer.py --workdir=workdirs/va_tf_cached \
    --config.data.features=workdirs/va/features
  python -m abaw_jax.main --config=configs/transformer.py:backbone=none \
    --workdir=workdirs/va_tf_fusion --config.data.features=workdirs/va/features,workdirs/b/features
"""

from abaw_jax import config_lib


def get_config(arg: str = ""):
    args = config_lib.parse_arg(arg, real=False, task="va", backbone="ddamfn_tiny")
    c = config_lib.temporal(args.task, "real" if args.real else "", head="transformer")
    if args.backbone == "none":  # a head on cached features only (data.features)
        c.model.backbone = None
        del c.model["backbone_kwargs"]
    elif args.backbone != "ddamfn_tiny":  # another frame family, with its defaults
        c.model.backbone = args.backbone
        c.model.backbone_kwargs = {}
    return c
