"""``python -m minidiff``: the same command line as ``minidiff``."""

import sys

from minidiff.cli import main

sys.exit(main())
