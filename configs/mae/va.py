r"""Valence-arousal regression (CCC loss) with the MAE-ViT
fine-tuning encoder (ABAW-6, issue 16): global average pooling of the patch tokens, fc_norm,
the task layer; drop path 0.1, AdamW with layer-wise lr decay 0.65 (embeddings layer 0, block i
layer i + 1, head last), lr 5e-4 x batch / 256.

Synthetic Aff-Wild2, tiny MAE-ViT on 32x32 faces, from the encoder of a pretraining run
(configs/mae/pretrain.py), or from scratch without init=:
  python -m abaw_jax.main --config=configs/mae/va.py:init=workdirs/mae_pretrain \
    --workdir=workdirs/mae_va
ViT-B/16 at 224x224 from a converted reference checkpoint (python -m abaw_jax.convert mae) or
a pretraining workdir of configs/mae/pretrain.py:real:
  python -m abaw_jax.main --config=configs/mae/va.py:real,init=weights/mae_b16_encoder \
    --workdir=workdirs/mae_va_real --config.data.root=/data/affwild2
Arguments: real, init=<pretraining workdir or converted folder>.
"""

from abaw_jax import config_lib


def get_config(arg: str = ""):
    return config_lib.mae("va", arg)
