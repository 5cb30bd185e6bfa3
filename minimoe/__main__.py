"""`python -m minimoe ...` is the `minimoe` command (and what torchrun launches with -m)."""

import sys

from minimoe.cli import main

sys.exit(main())
