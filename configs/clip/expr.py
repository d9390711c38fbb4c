r"""8-class expression recognition with CLIP (ABAW-8's CLIP+FC): the frozen CLIP image tower,
Dense(512) + ReLU, Dense(projection) linear, cosine to the 8 class prompts' embeddings, trained
with CLIP's symmetric contrastive loss (temperature 0.07).

Synthetic Aff-Wild2 and, without weights, a tiny RANDOM CLIP (the console says so):
  python -m abaw_jax.main --config=configs/clip/expr.py --workdir=workdirs/clip_expr
With a real CLIP (a transformers model folder, e.g. openai/clip-vit-base-patch16 downloaded by
you, converted once; its tokenizer embeds the prompts there):
  python -m abaw_jax.convert clip --hf_dir=/models/clip-vit-base-patch16 --out=weights/clip_b16
  python -m abaw_jax.main --config=configs/clip/expr.py:real,weights=weights/clip_b16 \
    --workdir=workdirs/clip_expr_real --config.data.root=/data/affwild2
The tower is frozen, so with weights the head trains on its embeddings, extracted once into
the data cache by the first run (data.features=auto; --config.data.features=None trains end to
end). Arguments: real, weights=<converted folder>.
"""

from abaw_jax import config_lib


def get_config(arg: str = ""):
    return config_lib.clip("expr", arg)
