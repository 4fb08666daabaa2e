"""``python -m bidder``: the ``bidder`` command, for when the console script is not on PATH."""
import sys

from bidder.cli import main

sys.exit(main())
