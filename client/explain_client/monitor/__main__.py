"""``python -m explain_client.monitor``: the ``explain-monitor`` command."""

from explain_client.monitor.cli import main

raise SystemExit(main())
