"""Tiered backend: a local LRU (or any fast tier) in front of any remote store.

``tiered`` stacks backends, fastest first, e.g. a bounded ``memory`` tier on the consumer,
``fs`` on /dev/shm, then ``redis`` or ``s3``::

    ectransfer.open_backend(backend="tiered", tiers=[
        {"url": "memory://", "max_bytes": "2GiB"},
        {"url": "redis://cache:6379/0"},
    ])

Reads go down the tiers and promote what they find into the faster ones; puts write each
tier by its ``write`` policy (``through``, ``back`` or ``around``); eviction and expiry are
each tier's own (``max_bytes``, ``ttl_s``). See :mod:`ectransfer.backends.tiered.backend` for
the contract of each operation and ``docs/backends/tiered.md`` for the whole story.
"""

from __future__ import annotations

from ectransfer.backends.tiered.backend import TieredBackend
from ectransfer.backends.tiered.config import WRITE_POLICIES, TieredConfig, TierSpec, derive_capabilities

__all__ = ["WRITE_POLICIES", "TierSpec", "TieredBackend", "TieredConfig", "derive_capabilities"]
