"""Configuration of the fsspec backend: the typed options, URL parsing, filesystem construction."""

from __future__ import annotations

import dataclasses
import inspect
import threading
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import urlsplit

from ectransfer.backends.fsspec._redact import scrub
from ectransfer.config import BackendConfig, redact_url, size
from ectransfer.config import secret as secret_field
from ectransfer.errors import BackendUnavailableError, ConfigError

__all__ = ["OBJECT_STORES", "S3_ONLY_OPTIONS", "FsspecConfig", "accepts", "config_from_url", "make_filesystem"]

#: protocols whose single write (PUT, completed multipart) is atomic: written in place.
#: Every other protocol writes a temporary file and moves it over the entry.
OBJECT_STORES = frozenset({"s3", "gcs", "gs", "abfs", "abfss", "az", "oss", "oci", "memory"})
#: options that only the s3 protocol understands (others take ``storage_options``)
S3_ONLY_OPTIONS = ("endpoint_url", "key", "secret", "token", "region")
_MIN_PART = 5 << 20  # S3 refuses smaller parts (except the last)


@dataclasses.dataclass(frozen=True)
class FsspecConfig(BackendConfig):
    """Options of the fsspec backend (``s3://bucket/prefix?endpoint_url=...``).

    ``protocol`` and ``root`` (``bucket/prefix`` for s3, a path otherwise) come from the URL.
    ``key``/``secret``/``token``, when absent, come from the standard AWS chain (environment,
    ``~/.aws``, instance role). ``storage_options`` go to the fsspec filesystem unchanged (for
    gcs, abfs, ...; for s3 they are merged under the explicit options). Entries of at least
    ``multipart_threshold`` bytes are uploaded in ``part_size`` parts (s3). ``max_concurrency``
    bounds the requests of one batch and of one upload in parts. ``timeout_s`` bounds connect,
    every read, and each operation as a whole; ``retries`` bounds retries of a failed request
    (within that same bound). ``rename_writes`` (default: every protocol that is not an object
    store) writes a temporary file and moves it over the entry.
    """

    backend_name: ClassVar[str] = "fsspec"
    protocol: str = ""
    root: str = ""
    endpoint_url: str | None = None
    key: str | None = secret_field()
    secret: str | None = secret_field()
    token: str | None = secret_field()
    region: str | None = None
    # May hold credentials (account keys, SAS tokens): kept out of repr and describe().
    storage_options: dict[str, Any] = dataclasses.field(
        default_factory=dict, repr=False, metadata={"kind": "secret"})
    multipart_threshold: int = size(32 << 20)
    part_size: int = size(16 << 20)
    max_concurrency: int = 8
    retries: int = 2
    create_bucket: bool = False
    accept_foreign: bool = True
    rename_writes: bool | None = None

    def validate(self) -> None:
        if not self.protocol:
            raise ConfigError("fsspec backend: option 'protocol' (or a URL such as s3://bucket/prefix) is required")
        if not self.root.strip("/"):
            raise ConfigError(f"fsspec backend: option 'root' (the bucket/path of {self.protocol}://...) is required")
        if self.protocol != "s3":
            given = [name for name in S3_ONLY_OPTIONS if getattr(self, name) is not None]
            if given:
                raise ConfigError(f"fsspec backend: option(s) {', '.join(map(repr, given))} apply to s3 only; "
                                  f"pass {self.protocol} settings in 'storage_options'")
        if self.protocol == "s3" and self.part_size < _MIN_PART:
            raise ConfigError(f"fsspec backend: option 'part_size' must be at least 5 MiB for s3, got {self.part_size}")
        if self.multipart_threshold < 2 * self.part_size:
            raise ConfigError(f"fsspec backend: option 'multipart_threshold' ({self.multipart_threshold}) must be "
                              f"at least twice 'part_size' ({self.part_size}): an upload in parts has two or more")
        if self.max_concurrency < 1:
            raise ConfigError(f"fsspec backend: option 'max_concurrency' must be >= 1, got {self.max_concurrency}")
        if self.retries < 0:
            raise ConfigError(f"fsspec backend: option 'retries' must be >= 0, got {self.retries}")

    @property
    def atomic_put(self) -> bool:
        """True if a single write of the filesystem is atomic (no temp file needed)."""
        return not self.rename_writes if self.rename_writes is not None else self.protocol in OBJECT_STORES

    @property
    def bucket(self) -> str:
        """The s3 bucket (first component of ``root``)."""
        return self.root.strip("/").split("/", 1)[0]

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        if self.endpoint_url:
            out["endpoint_url"] = redact_url(self.endpoint_url)
        return out


def config_from_url(url: str | None, options: Mapping[str, Any]) -> FsspecConfig:
    """``s3://bucket/prefix`` (or any ``protocol://path`` fsspec knows) plus options."""
    fixed: dict[str, Any] = {}
    if url:
        if "://" not in url:
            raise ConfigError(f"fsspec backend: expected a URL such as s3://bucket/prefix, got {redact_url(url)!r}")
        parts = urlsplit(url)
        protocol = parts.scheme.lower()
        protocol = "s3" if protocol == "s3a" else protocol
        fixed["protocol"] = protocol
        if protocol == "s3":
            if not parts.netloc:
                raise ConfigError(f"fsspec backend: an s3 URL names a bucket (s3://BUCKET/prefix), got {redact_url(url)!r}")
            fixed["root"] = f"{parts.netloc}{parts.path}".rstrip("/")
        elif protocol == "file":
            if parts.netloc not in ("", "localhost"):
                raise ConfigError(f"fsspec backend: file URLs name a local path, got host {parts.netloc!r}")
            fixed["root"] = parts.path.rstrip("/") or "/"
        else:
            fixed["root"] = _filesystem_class(protocol)._strip_protocol(url).rstrip("/")
    elif "protocol" in options and str(options["protocol"]).lower() == "s3a":
        options = {**options, "protocol": "s3"}
    return FsspecConfig.from_options(options, **fixed)


def _filesystem_class(protocol: str) -> Any:
    try:
        import fsspec
    except ImportError as exc:
        raise BackendUnavailableError(f"fsspec is not installed ({exc}); pip install 'ectransfer[s3]'") from exc
    try:
        return fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise ConfigError(f"fsspec backend: unknown protocol {protocol!r}") from None
    except ImportError as exc:
        raise BackendUnavailableError(
            f"fsspec protocol {protocol!r} needs a package that is not installed: {exc}") from exc


_SESSION: Any = None
_SESSION_LOCK = threading.Lock()


def _shared_session() -> Any:
    """One botocore session per process for backends with explicit credentials.

    A session caches the parsed S3 service model: a fresh one per backend costs 0.1-0.5 s per
    open. Credentials still go to each client; backends relying on the AWS chain get their own
    session, so each open resolves the chain anew.
    """
    global _SESSION
    with _SESSION_LOCK:
        if _SESSION is None:
            import aiobotocore.session

            _SESSION = aiobotocore.session.AioSession()
        return _SESSION


def accepts(method: Any, name: str) -> bool:
    """True if ``method`` takes the keyword ``name`` (s3fs grew ``max_concurrency`` over releases)."""
    try:
        return name in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


def _only_filesystem_options(cls: Any, opts: Mapping[str, Any]) -> bool:
    """True if every option is the filesystem's own: s3fs hands the rest to the session."""
    own = set(inspect.signature(cls.__init__).parameters) - {"session", "kwargs"}
    return set(opts) <= own | {"skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths"}


def make_filesystem(cfg: FsspecConfig) -> Any:
    """The fsspec filesystem for ``cfg`` (a new instance, not fsspec's shared cache)."""
    cls = _filesystem_class(cfg.protocol)
    opts: dict[str, Any] = dict(cfg.storage_options)
    opts["skip_instance_cache"] = True
    if cfg.protocol == "s3":
        # Timeouts and retries: botocore retries (with backoff) inside the operation bound;
        # s3fs's own retry loop would multiply the attempts, so it gets one try (below).
        opts["config_kwargs"] = {
            **opts.get("config_kwargs", {}),
            "connect_timeout": cfg.timeout_s,
            "read_timeout": cfg.timeout_s,
            "retries": {"total_max_attempts": cfg.retries + 1, "mode": "standard"},
            "max_pool_connections": max(10, 2 * cfg.max_concurrency),
        }
        if cfg.region:
            opts["client_kwargs"] = {**opts.get("client_kwargs", {}), "region_name": cfg.region}
        for name in ("endpoint_url", "key", "secret", "token"):
            if getattr(cfg, name) is not None:
                opts[name] = getattr(cfg, name)
        opts.setdefault("use_listings_cache", False)
        if cfg.key and cfg.secret and _only_filesystem_options(cls, opts):
            opts["session"] = _shared_session()
    try:
        fs = cls(**opts)
    except (TypeError, ValueError) as exc:
        secrets = [cfg.key, cfg.secret, cfg.token, *(v for v in cfg.storage_options.values() if isinstance(v, str))]
        raise ConfigError(f"fsspec backend: the {cfg.protocol} filesystem refused its options "
                          f"(check 'storage_options'): {scrub(str(exc), secrets)}") from None
    if cfg.protocol == "s3":
        fs.retries = 1
    return fs
