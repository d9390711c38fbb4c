"""`python -m abaw_jax.convert <family> ...`"""

import sys

from abaw_jax.convert import main

sys.exit(main(sys.argv[1:]))
