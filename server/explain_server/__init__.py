"""clip-explain server: preloaded open_clip CLIP models explained over gRPC (``explain.v1.Explain``).

Install with ``pip install "clip-explain[server]"``; run ``explain-server --help``.
"""

import importlib.util

if importlib.util.find_spec("torch") is None:  # `pip install .` installs only the thin client's dependencies
    raise ImportError('explain_server needs the server extra: pip install "clip-explain[server]"')
