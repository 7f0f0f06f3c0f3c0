"""Built-in backends, one module each; imported lazily through :mod:`ectransfer.registry`.

A backend module imports only the standard library, torch and ectransfer at import time; its
optional dependency (redis, fsspec, mooncake, nixl) is imported when a backend is opened.
"""
