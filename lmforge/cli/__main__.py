"""`python -m lmforge.cli`, as the `lmforge` script."""

import sys

from lmforge.cli import main

sys.exit(main())
