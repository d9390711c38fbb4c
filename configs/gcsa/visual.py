r"""8-class expression recognition from faces with the GCSA paper's visual network (ABAW-8):
RHCNN (two conv blocks, residual blocks of 1x1 conv -> NxN depthwise -> 1x1 conv with a channel
shuffle), global channel-spatial attention, dropout 0.2, a linear classifier, trained with the
coarse-fine granularity loss and SGD (momentum 0.9; the network's layers at 10x the
classifier's learning rate).

Synthetic Aff-Wild2, tiny RHCNN on 64x64 faces (sizes in abaw_jax/models/gcsa.py):
  python -m abaw_jax.main --config=configs/gcsa/visual.py --workdir=workdirs/gcsa_visual
The paper's settings (lr 1e-4, the network's layers 1e-3, batch 16; our 112x112 RHCNN):
  python -m abaw_jax.main --config=configs/gcsa/visual.py:real --workdir=workdirs/gcsa_visual_real \
    --config.data.root=/data/affwild2
Arguments: real, gcsa=false (the paper's "Base", without the module), loss=ce (cross-entropy in
place of the coarse-fine loss).
"""

from abaw_jax import config_lib


def get_config(arg: str = ""):
    return config_lib.gcsa("visual", arg)
