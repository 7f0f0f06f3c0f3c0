"""Fixtures for the vLLM adapter tests: the tiny model, and one real store per backend.

The backend parametrization reuses the fault-matrix targets (tests/faults/target_*.py), so every
backend that has a target — a real server on loopback — runs the adapter tests too; backends
whose server cannot start here skip with the target's reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ectransfer.testing.vllm import read_result, use_cpu_env, write_tiny_model
from tests.faults.targets import Target, all_targets

use_cpu_env()  # before vLLM is first imported
try:
    import vllm  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"vLLM is not installed ({exc}); scripts/install-vllm.sh installs it", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]
ADAPTER_BACKENDS = sorted(n for n in all_targets() if n != "memory")  # memory is in-process only


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    use_cpu_env()
    # vLLM caches per-architecture model inspection here; producer processes inherit it.
    os.environ.setdefault("VLLM_CACHE_ROOT", str(tmp_path_factory.mktemp("vllm-cache")))
    return str(write_tiny_model(tmp_path_factory.mktemp("tiny-blip2")))


@dataclass
class Case:
    """One backend's store, reachable from several processes."""

    name: str
    target: Target
    extra: dict[str, Any]
    peer_to_peer: bool
    producer: subprocess.Popen[str] | None = None

    def corrupt(self, key: str, mutation: str) -> None:
        """Rewrite the stored entry of ``key`` with the conformance kit's ``mutation``."""
        if self.peer_to_peer:  # the entry lives in the producer process's arena: it rewrites it
            self._ask({"corrupt": key, "mutation": mutation}, 60.0)
            return
        from ectransfer.connector.options import Role, split_options
        from ectransfer.testing import MUTATIONS

        mutate = MUTATIONS[mutation]
        be = split_options(self.extra)[1].open(Role.CONSUMER)
        try:
            self.target.corrupt(be, key, mutate)
        finally:
            be.close()

    def produce(self, model: str, requests: list[dict[str, Any]], *, timeout_s: float = 120.0) -> dict[str, Any]:
        """Have this backend's vLLM producer process (started on first use, one per backend)
        encode ``requests`` and save their items; return what it answered (params, encoded)."""
        if self.producer is None or self.producer.poll() is not None:
            path = self.target.workdir / "producer.json"
            path.write_text(json.dumps({"model": model, "extra": self.extra}))
            self.producer = subprocess.Popen([sys.executable, "-m", "ectransfer.testing.vllm", "producer", str(path)],
                                             cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        return self._ask({"requests": requests}, timeout_s)

    def _ask(self, command: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        proc = self.producer
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(command) + "\n")
        proc.stdin.flush()
        try:
            return read_result(proc.stdout, timeout_s)
        except (TimeoutError, EOFError) as exc:
            proc.kill()
            proc.wait(30)
            raise AssertionError(f"producer process: {exc} (exit code {proc.returncode})") from None

    def close(self) -> None:
        proc = self.producer
        if proc is not None and proc.poll() is None:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
        self.target.close()


@pytest.fixture(scope="module", params=ADAPTER_BACKENDS)
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Case]:
    from ectransfer.registry import backend_class, backend_for_url

    target = all_targets()[request.param](tmp_path_factory.mktemp(f"vllm-{request.param}"))
    url = target.url()
    p2p = backend_class(backend_for_url(url)).capabilities.peer_to_peer
    if p2p:
        # The vLLM producer process is the peer: it listens where the consumers look.
        from ectransfer.testing.servers import free_port

        url, options = f"{url.split('://')[0]}://127.0.0.1:{free_port()}", {}
    else:
        options = target.options()
    c = Case(request.param, target, {"url": url, **options, "load_timeout_s": 20.0}, p2p)
    try:
        yield c
    finally:
        c.close()
