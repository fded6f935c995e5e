"""`python -m truedepth ...` (also `torchrun -m truedepth ...`)."""

import sys

from .cli import main

sys.exit(main())
