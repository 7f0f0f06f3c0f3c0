"""fsspec backend faults against real moto_server processes: a server stopped mid-run, retries
that must not outlast ``timeout_s``, a stalled connection, missing buckets, bad credentials, and
credentials that must never show in messages, ``repr`` or logs."""

from __future__ import annotations

import logging
import secrets
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from ectransfer import (
    BackendConnectionError,
    ConfigError,
    EntryNotFoundError,
    StorageIOError,
    TransferTimeoutError,
    open_backend,
)
from ectransfer.testing import make_tensor, same_bits
from ectransfer.testing.proxy import StallingProxy
from ectransfer.testing.servers import SpawnedServer, free_port

pytest.importorskip("s3fs", reason="the fsspec backend tests need s3fs: pip install 'ectransfer[s3]'")

from ectransfer.testing.servers.fsspec import BUCKET, spawn

TIMEOUT_S = 2.0
SLACK_S = 6.0  # scheduling slack on a loaded 2-core machine; the bound is what matters
NETWORK_ERRORS = (BackendConnectionError, TransferTimeoutError)


@pytest.fixture
def own_moto(tmp_path: Path) -> Iterator[SpawnedServer]:
    """A server this test may stop."""
    server = spawn(tmp_path)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpawnedServer]:
    server = spawn(tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


def _bounded(call: Callable[[], object], errors: tuple[type[BaseException], ...] = NETWORK_ERRORS,
             bound_s: float = TIMEOUT_S) -> BaseException:
    t0 = time.monotonic()
    with pytest.raises(errors) as info:
        call()
    elapsed = time.monotonic() - t0
    assert elapsed < bound_s + SLACK_S, f"{type(info.value).__name__} only after {elapsed:.1f} s"
    return info.value


# ------------------------------------------------------------------------- server gone
def test_server_stopped_mid_run(own_moto: SpawnedServer) -> None:
    # retries=0: a refused call fails at once (retries within the bound: the next test)
    be = open_backend(own_moto.url, timeout_s=TIMEOUT_S, retries=0, **own_moto.options)
    t = make_tensor((256, 64), torch.bfloat16, seed=1)
    be.put("k", t)
    results: list[BaseException] = []

    def busy() -> None:
        try:
            for _ in range(10_000):
                be.put("k", t)
                assert same_bits(be.get("k"), t), "a wrong tensor was returned"
        except BaseException as exc:  # noqa: BLE001 - inspected below
            results.append(exc)

    th = threading.Thread(target=busy, daemon=True)
    th.start()
    time.sleep(0.3)
    own_moto.stop()
    th.join(TIMEOUT_S + SLACK_S)
    assert not th.is_alive(), "the running put/get loop hung after the server stopped"
    assert results and isinstance(results[0], NETWORK_ERRORS), results
    for call in (lambda: be.get("k"), lambda: be.get_into("k", torch.empty_like(t)), lambda: be.put("k", t),
                 lambda: be.exists(["k", "j"]), lambda: be.delete(["k"]), lambda: be.get_many(["k", "j"]),
                 lambda: be.put_many({"a": t, "b": t}), lambda: be.clear()):
        _bounded(call)
    be.close()


def test_retries_never_outlast_the_timeout(own_moto: SpawnedServer) -> None:
    """Ten retries with botocore's backoff take far longer than timeout_s: the bound wins."""
    be = open_backend(own_moto.url, timeout_s=1.5, retries=10, **own_moto.options)
    own_moto.stop()
    err = _bounded(lambda: be.get("k"), bound_s=1.5)
    assert "timed out" in str(err) or isinstance(err, BackendConnectionError), err
    be.close()


def test_no_server_at_open(moto: SpawnedServer) -> None:
    opts = {**moto.options, "endpoint_url": f"http://127.0.0.1:{free_port()}"}
    err = _bounded(lambda: open_backend(moto.url, timeout_s=TIMEOUT_S, **opts))
    assert "127.0.0.1" in str(err)


@pytest.mark.parametrize("op", ["put", "get"])
def test_stalled_connection_times_out(moto: SpawnedServer, op: str) -> None:
    port = int(moto.options["endpoint_url"].rsplit(":", 1)[1])
    with StallingProxy(port) as proxy:
        opts = {**moto.options, "endpoint_url": f"http://127.0.0.1:{proxy.port}"}
        be = open_backend(f"s3://{BUCKET}/stall-{op}", timeout_s=TIMEOUT_S, **opts)
        big = make_tensor((4 << 20,), torch.uint8)
        be.put("k", big)
        proxy.stall()
        try:
            call = (lambda: be.put("k2", big)) if op == "put" else (lambda: be.get("k"))
            assert isinstance(_bounded(call), TransferTimeoutError)
        finally:
            proxy.resume()
            be.close()


# ------------------------------------------------------------------------- buckets
def test_missing_bucket_is_a_config_error_naming_it(moto: SpawnedServer) -> None:
    with pytest.raises(ConfigError, match="'no-such-bucket'.*create_bucket"):
        open_backend("s3://no-such-bucket/p", **moto.options)


@pytest.mark.parametrize("region", [None, "eu-west-1"])
def test_create_bucket_on_open(moto: SpawnedServer, region: str | None) -> None:
    bucket = f"made-{region or 'default'}"
    with open_backend(f"s3://{bucket}/p", create_bucket=True, region=region, **moto.options) as be:
        be.put("k", torch.arange(4))
    with open_backend(f"s3://{bucket}/p", create_bucket=True, region=region, **moto.options) as be:
        assert torch.equal(be.get("k"), torch.arange(4)), "an existing bucket is reused as is"


def test_bucket_deleted_while_open(moto: SpawnedServer) -> None:
    import s3fs

    o = moto.options
    raw = s3fs.S3FileSystem(endpoint_url=o["endpoint_url"], key=o["key"], secret=o["secret"],
                            skip_instance_cache=True)
    with open_backend("s3://doomed/p", create_bucket=True, **o) as be:
        raw.rmdir("doomed")
        with pytest.raises(StorageIOError, match="'doomed' does not exist"):
            be.put("k", torch.ones(2))
        with pytest.raises(StorageIOError, match="'doomed' does not exist"):
            be.get("k")  # not "no entry": the whole store is gone


# ------------------------------------------------------------------------- credentials
@pytest.fixture
def auth_moto(tmp_path: Path) -> Iterator[SpawnedServer]:
    """moto checking credentials against its (empty) IAM: every access key is unknown."""
    server = spawn(tmp_path)  # the bucket is made while moto still accepts anything
    try:
        req = urllib.request.Request(f"{server.options['endpoint_url']}/moto-api/reset-auth", data=b"0",
                                     method="POST", headers={"Content-Type": "text/plain"})  # not a form body
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
        yield server
    finally:
        server.stop()


def _no_secret_anywhere(err: BaseException, text_parts: list[str], creds: list[str]) -> None:
    rendered = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    for part in [str(err), repr(err), rendered, *text_parts]:
        for c in creds:
            assert c not in part, f"credential {c[:3]}... leaked into: {part[:200]}"


def test_bad_credentials_clear_error_without_secret(auth_moto: SpawnedServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    opts = {**auth_moto.options, "secret": secrets.token_hex(20), "token": "tok-" + secrets.token_hex(12)}
    with pytest.raises(StorageIOError, match=f"'{BUCKET}' denied.*credentials") as info:
        open_backend(auth_moto.url, timeout_s=TIMEOUT_S, **opts)
    _no_secret_anywhere(info.value, [caplog.text], [opts["secret"], opts["token"], opts["key"]])


def test_credentials_never_in_repr_errors_or_logs(moto: SpawnedServer, caplog: pytest.LogCaptureFixture,
                                                 tmp_path: Path) -> None:
    caplog.set_level(logging.DEBUG)  # botocore logs request headers at DEBUG: they must be scrubbed
    opts = {**moto.options, "token": "tok-" + secrets.token_hex(12)}
    creds = [opts["secret"], opts["token"], opts["key"]]
    be = open_backend(f"s3://{BUCKET}/secrets?endpoint_url={opts.pop('endpoint_url')}", **opts,
                      multipart_threshold="10MiB", part_size="5MiB")
    texts = [repr(be), be.describe(), repr(be.config), str(be.config.describe())]
    be.put("k", torch.ones(3))
    be.put("big", torch.ones(11 << 18))  # an upload in parts
    be.get_many(["k", "big"])
    failures: list[BaseException] = []
    for call in (lambda: be.get("absent"),
                 lambda: open_backend("s3://no-such-bucket/p", endpoint_url=moto.options["endpoint_url"], **opts),
                 lambda: open_backend(moto.url, timeout_s=1, **{**opts, "endpoint_url": f"http://127.0.0.1:{free_port()}"})):
        with pytest.raises((EntryNotFoundError, ConfigError, BackendConnectionError, TransferTimeoutError)) as info:
            call()
        failures.append(info.value)
    be.close()
    assert texts[0].startswith("<FsspecBackend s3://")
    for err in failures:
        _no_secret_anywhere(err, texts + [caplog.text], creds)
    assert "Sending http request" in caplog.text, "botocore's DEBUG records were not captured: nothing was checked"


def test_storage_options_are_not_shown(tmp_path: Path) -> None:
    marker = "sas-" + secrets.token_hex(8)  # LocalFileSystem ignores options it does not know
    with open_backend(f"file://{tmp_path}", backend="fsspec", storage_options={"account_key": marker}) as be:
        for text in (repr(be), repr(be.config), str(be.config.describe()), be.describe()):
            assert marker not in text, text


def test_filesystem_refusing_an_option_is_a_config_error(moto: SpawnedServer) -> None:
    with pytest.raises(ConfigError, match="storage_options"):
        open_backend(moto.url, storage_options={"no_such_option": 1}, **moto.options)


def test_no_credentials_anywhere_is_a_config_error(moto: SpawnedServer, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Without key/secret the AWS chain applies; here it is empty (no env, files or metadata)."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ConfigError, match="credentials"):
        open_backend(moto.url, endpoint_url=moto.options["endpoint_url"], timeout_s=TIMEOUT_S)
