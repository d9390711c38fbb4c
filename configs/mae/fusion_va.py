r"""Valence and arousal with the 6th ABAW MAE fusion system: per frame, the frozen
visual embedding of a feature cache (a fine-tuned MAE ViT-B's 768 on the real data) joined with
audio features, Conv1d 256 -> Conv1d 128 (kernel 3) -> transformer encoder (4 layers, 4 heads,
dropout 0.3) -> per-frame valence and arousal, over clips of 100 frames (every 50),
CCC loss, AdamW 5e-5, batch 32 (models/temporal.py FusionHead,
config_lib.fusion).

The audio part (argument `audio=`): `logmel` (default), the mean and std of each mel band over
the frame's 1 s log-mel window; `cache`, the GCSA audio branch's embeddings, a second feature
cache after the visual one in data.features; `none`, visual only.

CPU default on the synthetic Aff-Wild2, the visual cache from a tiny DDAMFN run (any frame
model's --mode=extract will do; the real system's is the MAE's): three stages.
  python -m abaw_jax.main --config=configs/va.py --workdir=workdirs/va
  python -m abaw_jax.main --config=configs/va.py --workdir=workdirs/va --mode=extract
  python -m abaw_jax.main --config=configs/mae/fusion_va.py --workdir=workdirs/fusion_va \
    --config.data.features=workdirs/va/features
With the GCSA audio branch's embeddings in place of the log-mel statistics (two more stages):
(the GCSA configs are for expressions: --config.task=va trains the branch on these records)
  python -m abaw_jax.main --config=configs/gcsa/audio.py --workdir=workdirs/gcsa_audio_va \
    --config.task=va
  python -m abaw_jax.main --config=configs/gcsa/audio.py --workdir=workdirs/gcsa_audio_va \
    --config.task=va --mode=extract
  python -m abaw_jax.main --config=configs/mae/fusion_va.py:audio=cache \
    --workdir=workdirs/fusion_va_gcsa \
    --config.data.features=workdirs/va/features,workdirs/gcsa_audio_va/features
The paper's settings on the real data: the visual cache is --mode=extract of an MAE fine-tuning
run (configs/mae/va.py, issue 16 part 4) over the same records, then
  python -m abaw_jax.main --config=configs/mae/fusion_va.py:real \
    --workdir=workdirs/fusion_va_real --config.data.root=/data/affwild2 \
    --config.data.features=workdirs/mae_va/features
Arguments: real, audio=logmel|cache|none.
"""

from abaw_jax import config_lib


def get_config(arg: str = ""):
    return config_lib.fusion("va", arg)
