"""`python -m twotower.cli ...` (and `torchrun ... -m twotower.cli ...`): the `twotower` command."""

import sys

from twotower.cli import main

sys.exit(main())
