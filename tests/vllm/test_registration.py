"""How vLLM finds the connector, start-up validation, and the metrics vLLM exports."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest

from ectransfer import ConfigError, UnsupportedVersionError
from ectransfer.testing import same_bits
from ectransfer.testing.vllm import Engine, embedding_for, make_request, vllm_config
from tests.vllm.conftest import REPO

pytestmark = pytest.mark.vllm


def _run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


def test_plugin_import_and_register_import_no_backend() -> None:
    out = _run(
        "import sys, ectransfer.integrations.vllm as m; m.register(); m.register(); "
        "from vllm.distributed.ec_transfer.ec_connector.factory import ECConnectorFactory as F; "
        "assert 'ECTransferConnector' in F._registry; "
        "bad = sorted(k for k in sys.modules if k.startswith('ectransfer.backends.') "
        "or k in ('ectransfer.integrations.vllm.connector', 'ectransfer.connector.worker')); print(bad)")
    assert out == "[]", f"importing/registering the plugin imported {out}"


def test_plugin_never_overrides_an_existing_name() -> None:
    out = _run(
        "from vllm.distributed.ec_transfer.ec_connector.factory import ECConnectorFactory as F; "
        "from vllm.config import ECTransferConfig; "
        "F.register_connector('ECTransferConnector', "
        "'vllm.distributed.ec_transfer.ec_connector.example_connector', 'ECExampleConnector'); "
        "import ectransfer.integrations.vllm as m; m.register(); "
        "print(F.get_connector_class(ECTransferConfig(ec_connector='ECTransferConnector', ec_role='ec_consumer'))"
        ".__name__)")
    assert out == "ECExampleConnector"


def test_entry_point_route_end_to_end(tmp_path: Path, tiny_model: str) -> None:
    """load_general_plugins() (as vLLM calls it, repeatedly) then a config naming only the connector."""
    from importlib.metadata import entry_points

    if "ectransfer" not in {ep.name for ep in entry_points(group="vllm.general_plugins")}:
        pytest.skip("ectransfer is not installed as a distribution: no vllm.general_plugins entry point")
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    load_general_plugins()
    from ectransfer import open_backend

    store = tmp_path / "ec"
    with open_backend(str(store)) as producer:
        producer.put("img-plugin", embedding_for("img-plugin"))
    engine = Engine(vllm_config(tiny_model, "ec_consumer", {"url": f"file://{store}"}, module_path=False))
    try:
        assert type(engine.scheduler.ec_connector).__module__ == "ectransfer.integrations.vllm.connector"
        engine.add(make_request("r", ["img-plugin"]))
        engine.run()
        assert engine.encoded == []
        assert same_bits(engine.gathered["img-plugin"], embedding_for("img-plugin"))
    finally:
        engine.close()


@pytest.mark.parametrize("version, ok", [("0.32.9", False), ("0.33.0", True), ("0.34.1rc1", True),
                                         ("1.0.0", True), ("dev", False)])
def test_version_guard(version: str, ok: bool) -> None:
    from ectransfer.integrations.vllm.connector import _check_version

    if ok:
        _check_version(version)
    else:
        with pytest.raises(UnsupportedVersionError, match=r"needs vLLM >= 0\.33\.0"):
            _check_version(version)


@pytest.mark.parametrize("extra, match", [
    ({"url": "file:///tmp/x", "lookup_timeout": 1}, "lookup_timeout"),
    ({"url": "file:///tmp/x", "load_timeout_s": -1}, "load_timeout_s"),
    ({"backend": "nope"}, "unknown backend 'nope'"),
    ({}, "needs 'url'"),
])
def test_bad_extra_config_fails_start_up_naming_the_key(tiny_model: str, extra: dict[str, object],
                                                        match: str) -> None:
    from vllm.distributed.ec_transfer import ensure_ec_transfer_shutdown

    try:
        with pytest.raises(ConfigError, match=match):
            Engine(vllm_config(tiny_model, "ec_consumer", extra))
    finally:
        ensure_ec_transfer_shutdown()


def test_stats_reach_the_scheduler_stats_and_prometheus(tmp_path: Path, tiny_model: str) -> None:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from ectransfer import open_backend
    from ectransfer.integrations.vllm.connector import ECTransferConnector

    store = tmp_path / "ec"
    with open_backend(str(store)) as producer:
        producer.put("img-m", embedding_for("img-m"))
    engine = Engine(vllm_config(tiny_model, "ec_consumer", {"url": str(store)}))
    try:
        engine.add(make_request("r", ["img-m", "img-local"]))
        engine.run()
    finally:
        engine.close()
    stats = ECTransferConnector.build_ec_connector_stats({})
    assert stats is not None and stats.is_empty()
    for data in engine.stats:
        stats = stats.aggregate(ECTransferConnector.build_ec_connector_stats(data))  # type: ignore[arg-type]
    summary = stats.reduce()
    assert summary["loads"] == 1 and summary["fetches"] == 1 and summary["lookup_misses"] >= 1
    assert summary["fetch_p50_ms"] >= 0

    registry = CollectorRegistry()
    types = {cls: functools.partial(cls, registry=registry) for cls in (Counter, Gauge, Histogram)}
    prom = ECTransferConnector.build_prom_metrics(engine.config, types, ["engine"], {0: ["0"]})
    for data in engine.stats:
        prom.observe(data, 0)
    assert registry.get_sample_value("vllm:ectransfer_loads_total", {"engine": "0"}) == 1
    assert registry.get_sample_value("vllm:ectransfer_fetch_seconds_count", {"engine": "0"}) == 1
    assert registry.get_sample_value("vllm:ectransfer_load_bytes_total", {"engine": "0"}) == embedding_for(
        "img-m").numel() * 4


def test_credentials_never_reach_start_up_errors_or_logs(tiny_model: str, caplog: pytest.LogCaptureFixture) -> None:
    """A consumer whose store rejects it: the error and every log line stay free of the password."""
    pytest.importorskip("redis", reason="needs redis-py: pip install 'ectransfer[redis]'")
    import logging

    from vllm.distributed.ec_transfer import ensure_ec_transfer_shutdown

    from ectransfer import ECTransferError
    from ectransfer.testing.servers import free_port

    secret = "s3cr3t-" + "x" * 12
    url = f"redis://alice:{secret}@127.0.0.1:{free_port()}/0"
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ECTransferError) as info:
        try:
            Engine(vllm_config(tiny_model, "ec_consumer", {"url": url, "timeout_s": 2.0}))
        finally:
            ensure_ec_transfer_shutdown()
    assert secret not in str(info.value) and secret not in repr(info.value)
    assert "alice" in str(info.value) or "127.0.0.1" in str(info.value), "the error should say where"
    assert secret not in caplog.text
