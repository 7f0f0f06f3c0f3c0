"""Typed, validated backend configuration.

Each backend declares a frozen dataclass deriving from :class:`BackendConfig`. Options arrive
as keyword arguments, a dict (vLLM's ``ec_connector_extra_config``) and/or a URL query string;
:meth:`BackendConfig.from_options` coerces them to the declared types and raises
:class:`~ectransfer.errors.ConfigError` naming the bad option. Field metadata selects special
parsers: ``size`` ("8MiB", "2GB", 1048576) and ``secret`` (never shown in ``repr``).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar, get_type_hints
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from ectransfer.errors import ConfigError
from ectransfer.keys import validate_namespace

__all__ = ["BackendConfig", "TypedOptions", "parse_size", "redact_url", "secret", "size", "split_query"]

T = TypeVar("T", bound="TypedOptions")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "ki": 1 << 10, "kib": 1 << 10, "mi": 1 << 20, "mib": 1 << 20,
          "gi": 1 << 30, "gib": 1 << 30, "ti": 1 << 40, "tib": 1 << 40}


def parse_size(value: object, *, what: str = "size") -> int:
    """Parse a byte count: an int, or a string like ``"8MiB"``, ``"2GB"``, ``"512"``."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a byte size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{what}: must not be negative, got {value}")
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    raise ConfigError(f"{what}: expected a byte size such as 8388608, '8MiB' or '2GB', got {value!r}")


def size(default: int | None = None) -> Any:
    """A dataclass field holding a byte size (accepts ``"8MiB"``)."""
    return dataclasses.field(default=default, metadata={"kind": "size"})


def secret(default: str | None = None) -> Any:
    """A dataclass field holding a credential: excluded from ``repr`` and error messages."""
    return dataclasses.field(default=default, repr=False, metadata={"kind": "secret"})


_NESTED_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:/@\s\"'?#]*):[^@/\s\"'?#]*@")


_MASK_NESTED = r"\1:***@"


def redact_url(url: str) -> str:
    """``url`` with any password (and query values named like secrets) replaced by ``***``.

    Query values are scrubbed too: a URL inside one (a tiered stack's JSON ``tiers``, say)
    loses its ``user:password@`` password.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"{user}@{host}"
    query = "&".join(
        f"{k}=***" if re.search(r"pass|secret|token|key|signature|credential", k, re.I)
        else f"{k}={_NESTED_USERINFO.sub(_MASK_NESTED, v)}"
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    )
    out = urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    head = f"{parts.scheme}://"
    if url.lower().startswith(head) and not out.startswith(head):  # urlunsplit drops "//" before an empty authority
        out = head + out[len(parts.scheme) + 1:]
    return out


def split_query(url: str) -> tuple[str, dict[str, str]]:
    """Split ``url`` into the URL without its query and the query's options."""
    base, _, query = url.partition("?")
    return base, dict(parse_qsl(query, keep_blank_values=True))


def _coerce(name: str, typ: Any, kind: str | None, value: Any) -> Any:
    if kind == "size":
        return None if value is None else parse_size(value, what=name)
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(name, inner[0], kind, value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"option {name!r}: expected true/false, got {value!r}")
    if typ is int:
        try:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"option {name!r}: expected an integer, got {value!r}") from None
    if typ is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"option {name!r}: expected a number, got {value!r}") from None
    if typ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"option {name!r}: expected a string, got {type(value).__name__}")
        return str(value)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"option {name!r}: expected a list, got {type(value).__name__}")
        conv = [_coerce(name, args[0], None, v) for v in value] if args else list(value)
        return tuple(conv) if origin is tuple else conv
    if origin is dict or typ is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"option {name!r}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    return value


@dataclasses.dataclass(frozen=True)
class TypedOptions:
    """Base of every typed option set: coercion from strings/dicts, validation, safe describe.

    Subclasses are frozen dataclasses; :meth:`label` names the owner in error messages.
    """

    @classmethod
    def label(cls) -> str:
        return cls.__name__

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; override and raise :class:`ConfigError` naming the option."""

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.init]

    @classmethod
    def from_options(cls: type[T], options: Mapping[str, Any] | None = None, **fixed: Any) -> T:
        """Build the options from user ``options`` plus values the URL parser ``fixed``.

        Unknown options raise :class:`ConfigError` listing the known ones. An option given
        both in the URL and explicitly must agree.
        """
        options = dict(options or {})
        known = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ConfigError(
                f"{cls.label()}: unknown option(s) {', '.join(map(repr, unknown))}; "
                f"known options: {', '.join(sorted(known))}"
            )
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for name, value in {**fixed, **options}.items():
            if name in fixed and name in options and fixed[name] != options[name] and options[name] is not None:
                raise ConfigError(f"{cls.label()}: option {name!r} given twice with different values")
            f = known[name]
            values[name] = _coerce(name, hints[name], f.metadata.get("kind"), value)
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"{cls.label()}: {exc}") from None

    def describe(self) -> dict[str, Any]:
        """Options as a dict with secrets masked (safe to log)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = "***" if f.metadata.get("kind") == "secret" and v else v
        return out


@dataclasses.dataclass(frozen=True)
class BackendConfig(TypedOptions):
    """Options every backend understands.

    ``namespace`` isolates models sharing a store; ``timeout_s`` bounds every network call and
    wait of the backend (0 < timeout).
    """

    backend_name: ClassVar[str] = "?"
    namespace: str = ""
    timeout_s: float = 30.0

    @classmethod
    def label(cls) -> str:
        return f"{cls.backend_name} backend"

    def __post_init__(self) -> None:
        object.__setattr__(self, "namespace", validate_namespace(self.namespace))
        if not self.timeout_s > 0:
            raise ConfigError(f"option 'timeout_s' must be > 0, got {self.timeout_s!r}")
        self.validate()
