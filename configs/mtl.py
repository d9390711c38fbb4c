r"""Multi-task DDAMFN on the s-Aff-Wild2 multi-task files: valence-arousal, 8 expressions and
12 AUs from one network (three task layers), scored by the 7th-ABAW P = CCC_mean + F1_EXPR +
F1_AU (reported with its parts, and with AU thresholds as p_score_thresholded).

Two-stage fine-tuning in one run: for the first third of the steps only the task layers train
(group "tasks"), the rest frozen and no attention-head loss; then everything trains (group
"backbone", its own learning rate, warmed up from its start) and the head loss is added.

Synthetic Aff-Wild2, tiny DDAMFN, a few minutes on a 2-core CPU:
  python -m abaw_jax.main --config=configs/mtl.py --workdir=workdirs/mtl
Only frames valid for all three tasks (the 7th ABAW paper's filter):
  python -m abaw_jax.main --config=configs/mtl.py --workdir=workdirs/mtl_strict \
    --config.data.strict=True
Evaluate the best checkpoint:
  python -m abaw_jax.main --config=configs/mtl.py --workdir=workdirs/mtl --mode=eval
Real Aff-Wild2 at the papers' scale, from the official DDAMFN weights:
  python -m abaw_jax.main --config=configs/mtl.py:real --workdir=workdirs/mtl_real \
    --config.data.root=/data/affwild2 --config.init_from=/data/ddamfn_affectnet8
"""

import ml_collections

from abaw_jax import config_lib


def get_config(arg: str = ""):
    c = config_lib.experiment("mtl", arg)
    c.loss.balance = True  # per-AU positive weights and EXPR class weights from the train split
    c.loss.task_weights = ml_collections.ConfigDict({"va": 1.0, "expr": 1.0, "au": 1.0})
    stage2 = c.total_steps // 3
    c.optim.groups = ml_collections.ConfigDict({
        "tasks": {"pattern": "^tasks/", "lr": c.optim.lr * 3},
        "backbone": {"pattern": "^(features|heads|gdconv)/", "lr": c.optim.lr,
                     "start_step": stage2},
    })
    c.loss.head_start_step = stage2
    return c
