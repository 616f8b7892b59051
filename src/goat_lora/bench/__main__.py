"""`python -m goat_lora.bench`: the same as `goat bench`."""

import sys

from . import main

sys.exit(main())
