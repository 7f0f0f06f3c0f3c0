"""Registry, open_backend dispatch, and the `ectransfer backends` command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import ectransfer
from ectransfer import BackendUnavailableError, ConfigError, open_backend
from ectransfer.backends.fs import FsBackend
from ectransfer.backends.memory import MemoryBackend
from ectransfer.cli import main
from ectransfer.registry import BUILTIN_BACKENDS, EXTRAS, registered_backends


def test_builtins_registered_via_entry_points_too() -> None:
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="ectransfer.backends")}
    if not eps:
        pytest.skip("ectransfer is not installed as a distribution (no entry-point metadata)")
    assert eps == BUILTIN_BACKENDS


def test_dispatch_by_scheme(tmp_path: Path) -> None:
    assert isinstance(open_backend(f"file://{tmp_path}"), FsBackend)
    assert isinstance(open_backend(str(tmp_path)), FsBackend)
    assert isinstance(open_backend("memory://"), MemoryBackend)
    assert isinstance(open_backend(backend="memory"), MemoryBackend)


def test_unknown_backend_and_scheme() -> None:
    with pytest.raises(ConfigError, match="unknown backend 'nope'"):
        open_backend(backend="nope")
    with pytest.raises(ConfigError, match="unknown URL scheme 'zzz'"):
        open_backend("zzz://x")
    with pytest.raises(ConfigError, match="needs a URL"):
        open_backend()


@pytest.mark.parametrize("typo", ["memory:", "memory:/a", "redis:localhost:6379", "file:/tmp/x"])
def test_scheme_without_slashes_is_not_a_path(typo: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="'//' missing"):
        open_backend(typo)
    assert list(tmp_path.iterdir()) == [], "a typo'd URL must not create a directory"


def test_missing_extra_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend whose module cannot import raises BackendUnavailableError naming the extra."""
    monkeypatch.setitem(BUILTIN_BACKENDS, "redis", "ectransfer.backends._does_not_exist:X")
    with pytest.raises(BackendUnavailableError, match=r"pip install 'ectransfer\[redis\]'") as info:
        open_backend("redis://127.0.0.1:1")
    assert isinstance(info.value, ImportError)


def test_third_party_cannot_shadow_builtin(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib import metadata

    class EP:
        def __init__(self, name: str, value: str) -> None:
            self.name, self.value = name, value

    monkeypatch.setattr("ectransfer.registry.entry_points",
                        lambda group: [EP("fs", "evil:Backend"), EP("mine", "pkg.mod:Mine")])
    table = registered_backends()
    assert table["fs"] == BUILTIN_BACKENDS["fs"]
    assert table["mine"] == "pkg.mod:Mine"
    del metadata


def test_cli_backends_lists_everything(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert set(BUILTIN_BACKENDS) <= set(lines)
    assert "available" in lines["fs"] and "unavailable" not in lines["fs"]
    assert "available" in lines["memory"] and "unavailable" not in lines["memory"]
    for name, extra in EXTRAS.items():
        assert f"[{extra}]" in lines[name]


def test_console_script_runs() -> None:
    r = subprocess.run([sys.executable, "-m", "ectransfer.cli", "backends"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "fs" in r.stdout


def test_public_api_names() -> None:
    for name in ("open_backend", "Backend", "Capabilities", "InvalidKeyError", "EntryNotFoundError",
                 "CorruptEntryError", "BackendUnavailableError", "TransferTimeoutError",
                 "BackendConnectionError", "ConfigError", "ECTransferError"):
        assert hasattr(ectransfer, name)
    assert issubclass(ectransfer.EntryNotFoundError, KeyError)
    assert issubclass(ectransfer.InvalidKeyError, ValueError)
    assert issubclass(ectransfer.TransferTimeoutError, TimeoutError)
    assert issubclass(ectransfer.BackendConnectionError, ConnectionError)
    assert issubclass(ectransfer.BackendUnavailableError, ImportError)
