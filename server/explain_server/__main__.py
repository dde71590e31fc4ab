"""``python -m explain_server``: same as the ``explain-server`` console script."""

import sys

from .server import main

sys.exit(main())
