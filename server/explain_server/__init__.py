"""clip-explain server: preloaded open_clip CLIP models explained over gRPC (``explain.v1.Explain``).

The distribution clip-explain-server (``pip install . ./server`` from a checkout); run
``explain-server --help``.
"""

DISTRIBUTION = "clip-explain-server"
"""The distribution of the server and its commands, whose version ``--version`` prints."""
