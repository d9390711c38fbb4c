r"""MAE pretraining on face crops (ABAW-6's MAE-ViT, issue 16): the label-free masked
reconstruction (75 % of the patches removed) of the faces of `data.pretrain_splits`, with the
reference's recipe (AdamW betas 0.9/0.95, weight decay 0.05 off the norms, biases, tokens and
position embeddings, lr 1.5e-4 x batch / 256 re-derived from --config.batch_size, warm-up then
cosine, random resized crop 0.2-1 and flip). Each evaluation writes the validation
reconstruction loss (the same masking every time) and reconstruction-<step>.png to the workdir.

Synthetic Aff-Wild2, a tiny MAE on 32x32 faces (300 steps, about a minute on a 2-core CPU):
  python -m abaw_jax.main --config=configs/mae/pretrain.py --workdir=workdirs/mae_pretrain
ViT-B/16 at 224x224 (norm_pix_loss, batch 4096, 40,000 steps; the reference's settings are
in abaw_jax/config_lib.py `mae_pretrain`):
  python -m abaw_jax.main --config=configs/mae/pretrain.py:real \
    --workdir=workdirs/mae_pretrain_real --config.data.root=/data/affwild2
Then fine-tune from it: configs/mae/va.py:init=workdirs/mae_pretrain (and expr.py, au.py).
Arguments: real.
"""

from abaw_jax import config_lib


def get_config(arg: str = ""):
    return config_lib.mae_pretrain(arg)
