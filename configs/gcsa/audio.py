r"""8-class expression recognition from the sound around each frame with the GCSA paper's audio
network (ABAW-8): MCNN over the frame's log-mel window (data.audio: 1 s, 64 bands, frequency
masking when training): three branches (local, temporal and spatial kernels) of two conv blocks,
global channel-spatial attention, dropout 0.2, a linear classifier; coarse-fine loss, SGD.

Synthetic Aff-Wild2 (its sound carries an expression tone once the generator writes raw videos;
the records then hold their audio):
  python -m abaw_jax.main --config=configs/gcsa/audio.py --workdir=workdirs/gcsa_audio
The paper's settings on the real data (the raw videos beside the crops, see README "Raw videos
and audio"):
  python -m abaw_jax.main --config=configs/gcsa/audio.py:real --workdir=workdirs/gcsa_audio_real \
    --config.data.root=/data/affwild2
Arguments: real, gcsa=false, loss=ce (as configs/gcsa/visual.py).
"""

from abaw_jax import config_lib


def get_config(arg: str = ""):
    return config_lib.gcsa("audio", arg)
