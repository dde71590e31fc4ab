"""``python -m explain_client``: the ``explain-client`` command."""

from explain_client.cli import main

raise SystemExit(main())
