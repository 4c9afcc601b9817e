"""`python -m daemon.tools.hostile_peer ...` (see runner.py for the usage)."""

import sys

from daemon.tools.hostile_peer.runner import main

sys.exit(main(sys.argv[1:]))
