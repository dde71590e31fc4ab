"""clip-explain server: preloaded open_clip CLIP models explained over gRPC (``explain.v1.Explain``).

Install with ``pip install "clip-explain[server]"``; run ``explain-server --help``.
"""
