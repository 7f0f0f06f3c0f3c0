"""Which backends the bench runs, where they live, and why the others are skipped.

Selection: ``--backend NAME`` (repeatable; ``all`` = every registered backend; ``s3`` is an
alias of ``fsspec``), else the backends the ``--url`` values point to, else ``fs``.

``--url`` is matched to a backend by an explicit ``NAME=URL`` prefix (``redis=redis://h:6379``,
``fs=/mnt/nfs/ec``), else by its scheme through the registry's scheme table (``redis://`` →
redis, ``s3://`` → fsspec, ``file://`` or a plain path → fs, ...).

Location of each selected backend: its ``--url``; for fs without one, a fresh directory on
/dev/shm (tmpfs) when writable, else in the system temporary directory, removed at the end;
for memory, a named in-process store; otherwise, with ``--spawn``, the server that
``ectransfer.testing.servers.<backend>.spawn`` starts on loopback (stopped at the end).

A backend named individually or given a URL must work: any problem is a :class:`TargetError`
(the CLI exits with code 2). A backend reached only through ``all`` is skipped instead, with
the reason printed. Each target is opened twice (writer and reader, see
:class:`~ectransfer.bench.kinds.EctransferSubject`) and probed with one ``exists`` call, so an
unreachable server is reported before anything is measured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ectransfer.backend import Backend
from ectransfer.bench.raw import RawClient, raw_client_class
from ectransfer.config import redact_url
from ectransfer.errors import ECTransferError
from ectransfer.registry import SCHEMES, backend_class, open_backend, registered_backends

if TYPE_CHECKING:
    from ectransfer.testing.servers import SpawnedServer

__all__ = ["ALIASES", "Skip", "Target", "TargetError", "Targets", "parse_url_arg"]

#: names the bench accepts for a registered backend
ALIASES: dict[str, str] = {"s3": "fsspec"}
_NAME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9_+-]*)=(.+)$")


class TargetError(Exception):
    """A backend the user asked for by name or URL cannot be used (exit code 2)."""


@dataclasses.dataclass(frozen=True)
class Skip:
    """Something not measured, and why (printed, and recorded in the JSON config)."""

    backend: str
    kind: str
    reason: str


@dataclasses.dataclass
class Target:
    """One backend, opened twice on the same location."""

    name: str
    url: str
    options: dict[str, Any]
    where: str  # how the location was chosen, for the report
    writer: Backend[Any]
    reader: Backend[Any]
    fs_root: Path | None = None  # the directory, for the fs backend (vllm-example uses it)

    @property
    def shown_url(self) -> str:
        return redact_url(self.url)

    @property
    def peer_to_peer(self) -> bool:
        return bool(self.writer.capabilities.peer_to_peer)


def canonical(name: str) -> str:
    return ALIASES.get(name, name)


def _names_for(name: str) -> list[str]:
    """The registry name and its aliases: where spawn and raw modules may live."""
    return [name] + [a for a, n in ALIASES.items() if n == name]


def parse_url_arg(value: str) -> tuple[str, str]:
    """``(backend, url)`` for one ``--url`` value; raises :class:`TargetError`."""
    known = registered_backends()
    m = _NAME_RE.match(value)
    if m and canonical(m.group(1)) in known:
        return canonical(m.group(1)), m.group(2)
    if "://" in value:
        scheme = urlsplit(value).scheme.lower()
        if scheme in SCHEMES:
            return SCHEMES[scheme], value
        raise TargetError(f"--url {redact_url(value)}: unknown scheme {scheme!r}; write NAME=URL "
                          f"(backends: {', '.join(known)})")
    head, colon, _ = value.partition(":")
    if colon and head.lower() in SCHEMES and "/" not in head:
        raise TargetError(f"--url {redact_url(value)}: looks like a {head}:// URL with '//' missing")
    return "fs", value


def _default_fs_dir() -> tuple[Path, str]:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="ectransfer-bench-", dir=shm)), "temporary directory on tmpfs /dev/shm"
    d = Path(tempfile.mkdtemp(prefix="ectransfer-bench-"))
    return d, f"temporary directory in {tempfile.gettempdir()} (/dev/shm is not writable here)"


def _with_role(cls: type[Backend[Any]], options: dict[str, Any], role: str) -> dict[str, Any]:
    if "role" in cls.config_class.option_names():
        return {**options, "role": role}
    return options


class Targets(contextlib.ExitStack):
    """Resolve, open and probe the selected backends; closing it stops and removes everything."""

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id
        self.targets: list[Target] = []
        self.skips: list[Skip] = []
        self._workdir: Path | None = None

    def workdir(self) -> Path:
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="ectransfer-bench-spawn-"))
            self.callback(shutil.rmtree, self._workdir, True)
        return self._workdir

    def resolve(self, names: list[str], urls: list[str], *, spawn: bool) -> None:
        """Fill :attr:`targets` and :attr:`skips`; raise :class:`TargetError` for explicit failures."""
        known = registered_backends()
        by_url: dict[str, str] = {}
        for value in urls:
            name, url = parse_url_arg(value)
            if name in by_url:
                raise TargetError(f"two --url values for backend {name!r}")
            by_url[name] = url
        explicit: list[str] = []
        selected: list[str] = []
        for n in names or list(by_url) or ["fs"]:
            if n == "all":
                selected += list(known)
                continue
            c = canonical(n)
            if c not in known:
                raise TargetError(f"unknown backend {n!r}; registered backends: {', '.join(known)}, all "
                                  f"(aliases: {', '.join(f'{a}={b}' for a, b in ALIASES.items())})")
            selected.append(c)
            explicit.append(c)
        for name in by_url:
            if name not in selected:
                raise TargetError(f"--url for backend {name!r}, which --backend does not select")
        explicit += list(by_url)
        for name in dict.fromkeys(selected):
            try:
                self.targets.append(self._open(name, by_url.get(name), spawn=spawn))
            except TargetError as exc:
                if name in explicit:
                    raise
                self.skips.append(Skip(name, "ectransfer", str(exc)))

    def _open(self, name: str, url: str | None, *, spawn: bool) -> Target:
        try:
            cls = backend_class(name)
            ok, why = cls.is_available()
        except ECTransferError as exc:
            raise TargetError(f"backend {name!r} is not available here: {exc}") from None
        if not ok:
            raise TargetError(f"backend {name!r} is not available here: {why}")
        options: dict[str, Any] = {}
        fs_root = None
        if url is not None:
            where = "--url"
        elif name == "fs":
            fs_root, where = _default_fs_dir()
            self.callback(shutil.rmtree, fs_root, True)
            url = str(fs_root)
        elif name == "memory":
            url, where = f"memory://ectransfer-bench-{self.run_id}", "named in-process store"
        elif spawn:
            server = self._spawn(name)
            url, options, where = server.url, dict(server.options), "--spawn (local server on loopback)"
        else:
            raise TargetError(f"backend {name!r} has no default location: pass --url {name}=URL, "
                              "or --spawn to start a local server on loopback")
        shown = redact_url(url)
        try:
            writer = self.enter_context(open_backend(url, backend=name, **_with_role(cls, options, "producer")))
            reader = self.enter_context(open_backend(url, backend=name, **_with_role(cls, options, "consumer")))
            probe = f"ectb-{self.run_id}-probe"
            writer.exists([probe])
            reader.exists([probe])
        except Exception as exc:  # noqa: BLE001 - any failure to open or reach it is reported, not raised
            raise TargetError(f"backend {name!r}: cannot use {shown}: {type(exc).__name__}: {exc}") from None
        if name == "fs" and fs_root is None:
            root = getattr(writer, "root", None)
            fs_root = Path(root) if root is not None else None
        return Target(name, url, options, where, writer, reader, fs_root)

    def _spawn(self, name: str) -> SpawnedServer:
        fn: Callable[[Path], SpawnedServer] | None = None
        try:
            # Imported on use: only --spawn needs the server helpers.
            from ectransfer.testing.servers import spawner
        except ImportError as exc:
            raise TargetError(f"backend {name!r}: --spawn needs the test helpers ({exc}); "
                              "pip install 'ectransfer[dev]'") from None
        try:
            for n in _names_for(name):
                fn = spawner(n)
                if fn is not None:
                    break
        except ECTransferError as exc:
            raise TargetError(f"backend {name!r}: --spawn cannot load its server helper: {exc}") from None
        if fn is None:
            raise TargetError(f"backend {name!r}: no local server helper (ectransfer.testing.servers.{name}); "
                              f"pass --url {name}=URL")
        workdir = self.workdir() / f"{name}-{uuid.uuid4().hex[:6]}"
        workdir.mkdir()
        try:
            server = fn(workdir)
        except Exception as exc:  # noqa: BLE001 - a server that will not start is a reason, not a crash
            raise TargetError(f"backend {name!r}: --spawn could not start its server: {type(exc).__name__}: {exc}") \
                from None
        self.callback(server.stop)
        return server

    def raw_client(self, target: Target) -> RawClient | str:
        """The target's raw baseline client, or the reason there is none (never raises)."""
        try:
            cls = None
            for n in _names_for(target.name):
                cls = raw_client_class(n)
                if cls is not None:
                    break
        except Exception as exc:  # noqa: BLE001 - a broken baseline module is a skip reason
            return f"its raw baseline cannot be imported: {type(exc).__name__}: {exc}"
        if cls is None:
            return f"no raw baseline for {target.name} (ectransfer.bench.raw.{target.name})"
        try:
            client = cls(target.url, dict(target.options))
        except Exception as exc:  # noqa: BLE001
            return f"its raw client cannot reach {target.shown_url}: {type(exc).__name__}: {exc}"
        self.callback(client.close)
        return client
