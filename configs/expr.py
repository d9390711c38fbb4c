r"""8-class expression recognition with DDAMFN (cross-entropy).

Synthetic Aff-Wild2, tiny DDAMFN, a few minutes on a 2-core CPU:
  python -m abaw_jax.main --config=configs/expr.py --workdir=workdirs/expr
Evaluate the best checkpoint (metrics.json, per-video predictions, plots):
  python -m abaw_jax.main --config=configs/expr.py --workdir=workdirs/expr --mode=eval
ABAW submission files for the test list (post-processing chosen on validation):
  python -m abaw_jax.main --config=configs/expr.py --workdir=workdirs/expr --mode=predict
Real Aff-Wild2 at the papers' scale, from the official DDAMFN weights:
  python -m abaw_jax.main --config=configs/expr.py:real --workdir=workdirs/expr_real \
    --config.data.root=/data/affwild2 --config.init_from=/data/ddamfn_affectnet8
The same settings for another task: --config=configs/expr.py:task=au (arguments:
real, task=<va|expr|au|mtl>, comma-separated).
"""

from abaw_jax import config_lib


def get_config(arg: str = ""):
    return config_lib.experiment("expr", arg)
