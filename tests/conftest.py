"""Shared test setup: small machines need one intra-op thread (see docs/testing.md)."""

from __future__ import annotations

import os

import torch

pytest_plugins = ["tests.faults.report"]

torch.set_num_threads(1)
# Harmless for backends that do not read them (see ../shared notes on loopback servers).
os.environ.setdefault("MC_TCP_BIND_ADDRESS", "127.0.0.1")
os.environ.setdefault("UCX_NET_DEVICES", "lo")
os.environ.setdefault("UCX_MODULES", "^ib*")
