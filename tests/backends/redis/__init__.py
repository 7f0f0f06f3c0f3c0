"""Redis backend against real redis-server processes on loopback (standalone, chunked, Cluster).

``test_conformance``: the conformance kit four times (standalone; standalone with 1 KiB chunks,
so most items are chunked; a 3-node Cluster with 4 KiB chunks; standalone with the reader in
another process). ``test_layout``: chunks, versions, races, batches, TTL, Cluster slots,
eviction. ``test_connection``: options and URLs, TLS, Unix socket, authentication, capacity,
the server dying or restarting. Servers are started by the fixtures in ``conftest``.
"""
