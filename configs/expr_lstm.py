r"""8-class expression recognition (cross-entropy) with DDAMFN+LSTM over clips.

The backbone runs per frame, an LSTM (`model.hidden`, `model.layers`, `model.bidirectional`)
over each clip's per-frame embeddings, a task layer per frame; losses over the clips' valid
frames. Evaluation slides half-overlapping windows (`data.clip_length`, `data.clip_stride`)
over every video and averages them back onto every frame.

Synthetic Aff-Wild2, tiny backbone, a few minutes on a 2-core CPU:
  python -m abaw_jax.main --config=configs/expr_lstm.py --workdir=workdirs/expr_lstm
Evaluate, and write submission files for the test list:
  python -m abaw_jax.main --config=configs/expr_lstm.py --workdir=workdirs/expr_lstm --mode=eval
  python -m abaw_jax.main --config=configs/expr_lstm.py --workdir=workdirs/expr_lstm --mode=predict
Real Aff-Wild2, full DDAMFN backbone from the official weights:
  python -m abaw_jax.main --config=configs/expr_lstm.py:real --workdir=workdirs/expr_lstm_real \
    --config.data.root=/data/affwild2 --config.init_from=/data/ddamfn_affectnet8
"""

from abaw_jax import config_lib


def get_config(arg: str = ""):
    return config_lib.temporal("expr", arg)
