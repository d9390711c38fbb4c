r"""8-class expression recognition from faces and sound (the GCSA paper's system, ABAW-8): RHCNN
on the face and MCNN on the frame's log-mel window, each with global channel-spatial attention
and its own classifier, trained jointly (the two coarse-fine losses summed); their class
probabilities fused as P = (m P_audio + n P_visual) / (m + n), the integers m, n in 1..5 searched
on validation and stored with the checkpoint (eval, predict and inference.load apply them).

Synthetic Aff-Wild2, tiny networks, jointly:
  python -m abaw_jax.main --config=configs/gcsa/av.py --workdir=workdirs/gcsa_av
Separately: two runs, then their branches assembled and fused (nothing trained; step 0 is
evaluated and saved):
  python -m abaw_jax.main --config=configs/gcsa/visual.py --workdir=workdirs/gcsa_visual
  python -m abaw_jax.main --config=configs/gcsa/audio.py --workdir=workdirs/gcsa_audio
  python -m abaw_jax.main --workdir=workdirs/gcsa_av_separate \
    --config=configs/gcsa/av.py:visual=workdirs/gcsa_visual,audio=workdirs/gcsa_audio
The paper's settings on the real data (raw videos beside the crops):
  python -m abaw_jax.main --config=configs/gcsa/av.py:real --workdir=workdirs/gcsa_av_real \
    --config.data.root=/data/affwild2
Arguments: real, gcsa=false, loss=ce (as configs/gcsa/visual.py), visual=<workdir>,
audio=<workdir> (separate branches).
"""

from abaw_jax import config_lib


def get_config(arg: str = ""):
    return config_lib.gcsa("av", arg)
