"""clip-explain server: preloaded open_clip CLIP models explained over gRPC (``explain.v1.Explain``).

The distribution clip-explain-server (``pip install . ./server`` from a checkout); run
``explain-server --help``.
"""
