"""``python -m hf_sde.commands ...`` (the form ``accelerate launch -m`` needs)."""

import sys

from . import main

sys.exit(main())
