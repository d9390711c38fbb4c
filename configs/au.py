r"""12 action-unit detection with DDAMFN (binary cross-entropy).

Synthetic Aff-Wild2, tiny DDAMFN, a few minutes on a 2-core CPU:
  python -m abaw_jax.main --config=configs/au.py --workdir=workdirs/au
Evaluate the best checkpoint (metrics.json, per-video predictions, plots):
  python -m abaw_jax.main --config=configs/au.py --workdir=workdirs/au --mode=eval
ABAW submission files for the test list (post-processing chosen on validation):
  python -m abaw_jax.main --config=configs/au.py --workdir=workdirs/au --mode=predict
Real Aff-Wild2 at the papers' scale, from the official DDAMFN weights:
  python -m abaw_jax.main --config=configs/au.py:real --workdir=workdirs/au_real \
    --config.data.root=/data/affwild2 --config.init_from=/data/ddamfn_affectnet8
The same settings for another task: --config=configs/au.py:task=au (arguments:
real, task=<va|expr|au|mtl>, comma-separated).
"""

from abaw_jax import config_lib


def get_config(arg: str = ""):
    return config_lib.experiment("au", arg)
