"""A model worker: one process that owns a model's engine, dynamic batcher and factor cache.

``protocol`` is what crosses to and from the front end, ``process`` the process's entry
point, ``serve`` its message loop, ``backend`` the batch function (Triton's
``execute(jobs)``), ``factor_cache`` the cache of per-side factors.
"""
