"""NIXL backend: peer-to-peer transfers from the encoder (producer) to prefill (consumer).

NIXL moves bytes between registered memory of two agents; it is not a key-value store. A
**producer** keeps saved entries (wire-codec entries: header + payload) in an arena registered
with its NIXL agent once, and answers "do you have K / where is it" on a small msgpack control
endpoint (:mod:`.control`). A **consumer** looks keys up at one or more producers
(``nixl://enc1:7600,enc2:7600``) and pulls each payload with a NIXL READ, verifies its checksum
and lands it in the caller's tensor; ``release`` then lets the producer free it (a lease frees
it anyway). See docs/backends/nixl.md.

Roles (option ``role``): ``producer`` serves ``listen`` (default: the URL's first address),
``consumer`` looks up at every URL address, ``both`` does both, and ``auto`` (the default) is a
consumer that becomes the producer of ``listen`` on its first put. Nothing of NIXL is created
before data first moves: a scheduler-side consumer that only calls ``exists`` never creates an
agent.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Mapping
from typing import Any

import torch

from ectransfer.backend import Backend, Capabilities
from ectransfer.backends.nixl.agent import Agent
from ectransfer.backends.nixl.config import NixlConfig
from ectransfer.backends.nixl.consumer import Consumer
from ectransfer.backends.nixl.producer import Producer
from ectransfer.config import BackendConfig
from ectransfer.errors import ConfigError

__all__ = ["NixlBackend", "NixlConfig"]


class NixlBackend(Backend[NixlConfig]):
    name = "nixl"
    config_class = NixlConfig
    extra = "nixl"
    capabilities = Capabilities(
        # Entries live with the producer process, consumers pull them over the network;
        # the lease expires them; the arena is host memory (a device arena is untested).
        shared_across_hosts=True, persistent=False, ttl=True, zero_copy_device=False, peer_to_peer=True,
    )

    def __init__(self, config: NixlConfig) -> None:
        super().__init__(config)
        self._agent: Agent | None = None
        self._lock = threading.Lock()
        self._producer: Producer | None = None
        if config.serves:
            self._producer = Producer(config, self._namespace, self._get_agent)
        self._consumer = Consumer(config, self._namespace, self._get_agent, lambda: self._producer,
                                  remote=config.role != "producer")

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        # find_spec, not import: importing NIXL takes seconds and must wait until data moves.
        try:
            found = importlib.util.find_spec("nixl") is not None
        except (ImportError, ValueError) as exc:
            return False, f"nixl is not importable: {exc}"
        return (True, "") if found else (False, "the nixl package is not installed")

    @classmethod
    def config_from_url(cls, url: str | None, options: Mapping[str, Any]) -> BackendConfig:
        return NixlConfig.from_url(url, options)

    def _get_agent(self) -> Agent:
        with self._lock:
            if self._agent is None:
                self._agent = Agent(self.config.role, self.config.nixl_backend,
                                    progress=self.config.role != "consumer")
            return self._agent

    def _producer_for_put(self) -> Producer:
        with self._lock:
            if self._producer is None:
                if self.config.role != "auto":
                    raise ConfigError("nixl backend opened with role='consumer' cannot save: "
                                      "use role='producer' (or 'both') where entries are written")
                self._producer = Producer(self.config, self._namespace, self._get_agent)
            return self._producer

    # ----------------------------------------------------------------- primitives
    def _put(self, skey: str, tensor: torch.Tensor) -> None:
        self._producer_for_put().put(skey, tensor)

    def _get(self, skey: str) -> torch.Tensor:
        return self._consumer.fetch([skey], [None])[0]

    def _get_into(self, skey: str, out: torch.Tensor) -> None:
        self._consumer.fetch([skey], [out])

    def _get_many(self, skeys: list[str]) -> list[torch.Tensor]:
        return self._consumer.fetch(skeys, [None] * len(skeys))

    def _get_many_into(self, skeys: list[str], outs: list[torch.Tensor]) -> None:
        self._consumer.fetch(skeys, list(outs))

    def _exists(self, skeys: list[str]) -> list[bool]:
        return self._consumer.exists(skeys)

    def _delete(self, skeys: list[str]) -> None:
        self._consumer.delete(skeys)

    def _release(self, skeys: list[str]) -> None:
        self._consumer.release(skeys)

    def _close(self) -> None:
        self._consumer.close()
        if self._producer is not None:
            self._producer.close()
        if self._agent is not None:
            self._agent.close()

    # ----------------------------------------------------------------- introspection
    def stats(self) -> dict[str, Any]:
        """Arena and consumer state (msgpack-serialisable; tests read it through RemoteBackend)."""
        out: dict[str, Any] = {"role": self.config.role, "agent": self._agent.name if self._agent else None,
                               "serving": self._producer is not None, "arena_bytes": 0, "arena_used_bytes": 0,
                               "items": 0}
        if self._producer is not None:
            out.update(self._producer.stats())
        out.update(self._consumer.stats())
        return out

    def arena_used_bytes(self) -> int:
        """Bytes of the producer arena held by saved or still-pinned entries (0 if not serving)."""
        return int(self.stats()["arena_used_bytes"])

    def clear(self) -> None:
        """Drop every entry this process serves (pinned bytes go once their readers are done)."""
        self._check_open()
        if self._producer is not None:
            self._producer.clear()

    def entry_bytes(self, skey: str) -> bytes:
        """The stored bytes of storage key ``skey`` at this producer (diagnostics, fault tests)."""
        return self._serving("entry_bytes").entry_bytes(skey)

    def store_entry_bytes(self, skey: str, data: bytes) -> None:
        """Store raw ``data`` under storage key ``skey`` unvalidated: fault injection in tests only."""
        self._serving("store_entry_bytes").store_entry_bytes(skey, bytes(data))

    def _serving(self, what: str) -> Producer:
        self._check_open()
        if self._producer is None:
            raise ConfigError(f"nixl backend: {what} needs a producer (this process serves nothing)")
        return self._producer

    def describe(self) -> str:
        ns = f" namespace={self._namespace!r}" if self._namespace else ""
        where = ",".join(self.config.peers) or self.config.listen
        return f"nixl://{where} role={self.config.role}{ns}"
