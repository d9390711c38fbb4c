"""The model-family registry (`family.py` says what a family record holds): configs pick a
family by `model.name`; each model file registers its own families when imported here."""

from abaw_jax.models import clip, ddamfn, gcsa, mae, temporal  # noqa: F401  (they register their families)
from abaw_jax.models.family import (  # noqa: F401
    FAMILIES,
    Family,
    Preprocess,
    build,
    get,
    prepare_inputs,
    register,
)
