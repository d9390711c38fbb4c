r"""8-class expression recognition with CLIP+LSTM (ABAW-8): an LSTM (512) over the frozen CLIP
image tower's per-frame embeddings of clips (100 frames every 20 with `real`; short videos are
padded into one clip), a per-frame task layer trained with cross-entropy.

Synthetic Aff-Wild2 and, without weights, a tiny RANDOM CLIP trained with the head (slow to
learn through the LSTM: F1 0.097 after 1,000 steps):
  python -m abaw_jax.main --config=configs/clip/expr_lstm.py --workdir=workdirs/clip_expr_lstm
The CPU demo of the paper's frozen tower: the LSTM over the embeddings of the tower that
configs/clip/expr.py trained (F1 0.257 after 300 steps; see README "CLIP for expressions"):
  python -m abaw_jax.main --config=configs/clip/expr.py --workdir=workdirs/clip_expr
  python -m abaw_jax.main --config=configs/clip/expr.py --workdir=workdirs/clip_expr --mode=extract
  python -m abaw_jax.main --config=configs/clip/expr_lstm.py --workdir=workdirs/clip_expr_lstm \
    --config.data.features=workdirs/clip_expr/features
With a converted CLIP (see configs/clip/expr.py), on its embeddings extracted once:
  python -m abaw_jax.main --config=configs/clip/expr_lstm.py:real,weights=weights/clip_b16 \
    --workdir=workdirs/clip_lstm_real --config.data.root=/data/affwild2
Arguments: real, weights=<converted folder>.
"""

from abaw_jax import config_lib


def get_config(arg: str = ""):
    return config_lib.clip("expr", arg, head="lstm")
