"""``python -m protocol.client ARGS``: the ``corral`` command line (protocol/client/cli.py)."""

import sys

from protocol.client.cli import main

sys.exit(main())
