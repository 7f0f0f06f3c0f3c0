"""Key validation and namespacing, shared by every backend.

A key is what vLLM calls ``mm_hash``: a non-empty string of at most :data:`MAX_KEY_LENGTH`
characters from ``[A-Za-z0-9._:-]`` that is not ``.`` or ``..``. Anything else raises
:class:`~ectransfer.errors.InvalidKeyError` before a backend performs any I/O, so no key can
steer a backend into a path traversal (fs, fsspec) or a key injection (Redis, Mooncake).

A *namespace* (same charset) isolates models that share one store. Backends receive the
*storage key* ``"<namespace>/<key>"`` (or just ``"<key>"`` without a namespace); ``/`` never
occurs inside either part, so the mapping is injective.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from ectransfer.errors import InvalidKeyError

__all__ = ["MAX_KEY_LENGTH", "key_for_identifier", "storage_key", "validate_key", "validate_keys", "validate_namespace"]

MAX_KEY_LENGTH = 256
_KEY_RE = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_KEY_LENGTH}}}")


def _check(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidKeyError(f"{what} must be a str, got {type(value).__name__}")
    if not _KEY_RE.fullmatch(value) or value in (".", ".."):
        shown = value if len(value) <= 64 else value[:61] + "..."
        raise InvalidKeyError(
            f"invalid {what} {shown!r} (length {len(value)}): must be 1-{MAX_KEY_LENGTH} "
            "characters from [A-Za-z0-9._:-] and not '.' or '..'"
        )
    return value


def validate_key(key: object) -> str:
    """Return ``key`` unchanged if it is valid, else raise :class:`InvalidKeyError`."""
    return _check(key, "key")


def validate_keys(keys: Iterable[object]) -> list[str]:
    """Validate every key of ``keys`` (a single ``str`` is rejected: pass a list)."""
    if isinstance(keys, (str, bytes)):
        raise InvalidKeyError("expected a sequence of keys, got a single string; wrap it in a list")
    return [validate_key(k) for k in keys]


def validate_namespace(namespace: object) -> str:
    """Return a valid namespace; the empty string means "no namespace"."""
    if namespace in (None, ""):
        return ""
    return _check(namespace, "namespace")


def storage_key(namespace: str, key: str) -> str:
    """The key a backend stores under: ``namespace/key`` or ``key``."""
    return f"{namespace}/{key}" if namespace else key


def key_for_identifier(identifier: str) -> str:
    """A valid key for an engine's item identifier, the identifier itself whenever it is one.

    vLLM's ``mm_hash`` is a hex digest (a valid key, so entries keep vLLM's own file layout),
    but with LoRA it becomes ``"<lora_name>:<hash>"`` and a LoRA name may hold any character.
    Such identifiers map to ``"id-"`` plus a 128-bit BLAKE2b digest of the identifier: still
    one key per identifier, and never a path or a command.
    """
    if not isinstance(identifier, str):
        raise InvalidKeyError(f"item identifier must be a str, got {type(identifier).__name__}")
    if _KEY_RE.fullmatch(identifier) and identifier not in (".", ".."):
        return identifier
    return "id-" + hashlib.blake2b(identifier.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
