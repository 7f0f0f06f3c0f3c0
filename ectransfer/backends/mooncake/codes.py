"""Mooncake's integer error codes and the ectransfer error each one becomes.

Mooncake Store calls return ``0`` (or a byte count) on success and a negative
``mooncake::ErrorCode`` on failure. :data:`ERROR_CODES` lists the codes of the ``ErrorCode``
enum of Mooncake 0.3.13 (``mooncake-store/include/types.h`` and the store's RPC schema; the
long names were checked against the strings compiled into the wheel's ``store.so``) with the
ectransfer error class a caller sees. Releases number a few codes differently (-713 and -714
changed meaning between versions; 0.3.13 has no -713): a code missing here is reported as
``UNKNOWN`` with its number. :func:`error_for` builds
that error: an instance of the *exact* ectransfer class (so ``except EntryNotFoundError`` and
the two-process harness, which matches errors by class name, keep working) carrying the code
as ``exc.code`` and its name as ``exc.code_name``; the message says both.

Transient codes (a concurrent writer of the same key, a replica still being written) are
retried by the backend within ``timeout_s`` before they become errors: see
:data:`TRANSIENT_READ` and :data:`TRANSIENT_WRITE`.
"""

from __future__ import annotations

from ectransfer.errors import (
    BackendConnectionError,
    CapacityError,
    ConfigError,
    CorruptEntryError,
    ECTransferError,
    EntryNotFoundError,
    InvalidKeyError,
    StorageIOError,
    TransferTimeoutError,
)

__all__ = ["ERROR_CODES", "TRANSIENT_READ", "TRANSIENT_WRITE", "code_name", "error_for"]

_IO = StorageIOError
_NET = BackendConnectionError
_FULL = CapacityError
_MISS = EntryNotFoundError

#: code -> (name, the ectransfer error class it becomes)
ERROR_CODES: dict[int, tuple[str, type[ECTransferError]]] = {
    -1: ("INTERNAL_ERROR", _IO),
    -10: ("BUFFER_OVERFLOW", _FULL),
    -100: ("SHARD_INDEX_OUT_OF_RANGE", _IO),
    -101: ("SEGMENT_NOT_FOUND", _FULL),  # no segment to allocate from: nothing mounted
    -102: ("SEGMENT_ALREADY_EXISTS", _IO),
    -103: ("CLIENT_NOT_FOUND", _NET),  # the master forgot this client (its TTL expired)
    -200: ("NO_AVAILABLE_HANDLE", _FULL),  # the mounted segments are full (or none is mounted)
    -300: ("INVALID_VERSION", _IO),
    -400: ("INVALID_KEY", InvalidKeyError),
    -500: ("WRITE_FAIL", _IO),
    -600: ("INVALID_PARAMS", _FULL),  # Mooncake's answer to a buffer too small for the value
    -601: ("ILLEGAL_CLIENT", _IO),  # our write was preempted by another writer of the key
    -700: ("INVALID_WRITE", _IO),
    -701: ("INVALID_READ", _IO),
    -702: ("INVALID_REPLICA", _IO),
    -703: ("REPLICA_IS_NOT_READY", _MISS),  # being written, or its writer died before finishing
    -704: ("OBJECT_NOT_FOUND", _MISS),
    -705: ("OBJECT_ALREADY_EXISTS", _IO),
    -706: ("OBJECT_HAS_LEASE", _IO),
    -707: ("LEASE_EXPIRED", TransferTimeoutError),  # the read outlived its lease: data discarded
    -708: ("OBJECT_HAS_REPLICATION_TASK", _IO),
    -709: ("OBJECT_NO_REPLICATION_TASK", _IO),
    -710: ("REPLICA_NOT_FOUND", _MISS),
    -711: ("REPLICA_ALREADY_EXISTS", _IO),
    -712: ("REPLICA_IS_GONE", _MISS),
    -714: ("OBJECT_REPLICA_BUSY", _IO),
    -800: ("TRANSFER_FAIL", _NET),  # the segment holder is unreachable (or died)
    -801: ("CHECKSUM_MISMATCH", CorruptEntryError),
    -900: ("RPC_FAIL", _NET),  # the master is unreachable
    -901: ("RPC_TIMEOUT", TransferTimeoutError),
    -1000: ("ETCD_OPERATION_ERROR", _NET),
    -1001: ("ETCD_KEY_NOT_EXIST", _NET),
    -1002: ("ETCD_TRANSACTION_FAIL", _NET),
    -1003: ("ETCD_CTX_CANCELLED", _NET),
    -1004: ("OPLOG_ENTRY_NOT_FOUND", _NET),
    -1005: ("K8S_LEASE_OPERATION_ERROR", _NET),
    -1006: ("K8S_LEASE_NOT_FOUND", _NET),
    -1007: ("INCOMPLETE_OPLOG_CATCH_UP", _NET),
    -1010: ("UNAVAILABLE_IN_CURRENT_STATUS", _NET),  # an HA master that is not (yet) the leader
    -1011: ("UNAVAILABLE_IN_CURRENT_MODE", _NET),
    -1100: ("FILE_NOT_FOUND", _MISS),
    -1101: ("FILE_OPEN_FAIL", _IO),
    -1102: ("FILE_READ_FAIL", _IO),
    -1103: ("FILE_WRITE_FAIL", _IO),
    -1104: ("FILE_INVALID_BUFFER", _IO),
    -1105: ("FILE_LOCK_FAIL", _IO),
    -1106: ("FILE_INVALID_HANDLE", _IO),
    -1200: ("BUCKET_NOT_FOUND", _IO),
    -1201: ("BUCKET_ALREADY_EXISTS", _IO),
    -1202: ("KEYS_EXCEED_BUCKET_LIMIT", _FULL),
    -1203: ("KEYS_ULTRA_LIMIT", _FULL),
    -1300: ("UNABLE_OFFLOAD", _IO),
    -1301: ("UNABLE_OFFLOADING", _IO),
    -1400: ("TASK_NOT_FOUND", _IO),
    -1401: ("TASK_PENDING_LIMIT_EXCEEDED", _FULL),
    -1402: ("JOB_NOT_FOUND", _IO),
    -1500: ("SERIALIZE_UNSUPPORTED", _IO),
    -1501: ("SERIALIZE_FAIL", _IO),
    -1502: ("DESERIALIZE_FAIL", _IO),
    -1503: ("PERSISTENT_FAIL", _IO),
    -1600: ("DFS_NETWORK_TIMEOUT", TransferTimeoutError),
    -1601: ("DFS_SERVICE_UNAVAILABLE", _NET),
    -1602: ("DFS_QUOTA_EXCEEDED", _FULL),
    -1603: ("DFS_PERMISSION_DENIED", _IO),
    -1604: ("DFS_STALE_HANDLE", _IO),
    -1605: ("DFS_PARTIAL_WRITE", _IO),
    -1700: ("TENANT_QUOTA_EXCEEDED", _FULL),
    -1701: ("TENANT_NOT_REGISTERED", ConfigError),
    -1702: ("TENANT_NOT_EMPTY", _IO),
}

#: read failures that a moment later may be a success: the key is being replaced
#: (Mooncake updates a same-size value in place) or the read outlived its lease
TRANSIENT_READ = frozenset({-703, -707, -714})
#: write failures caused by another writer of the same key (Mooncake preempts the older
#: in-flight upsert, whose end then fails) or by a replication task holding the key
TRANSIENT_WRITE = frozenset({-601, -703, -704, -708, -714})

#: hints appended to the message, naming what the user can change
_HINTS: dict[int, str] = {
    -101: "no memory segment is mounted: start a segment holder or set global_segment_size > 0",
    -200: "the mounted segments are full (or none is mounted): mount more memory "
          "(global_segment_size of the holders) or delete entries",
    -800: "the process holding the entry's segment is unreachable or gone",
    -900: "the mooncake_master is unreachable",
}


def code_name(code: int) -> str:
    """The ``ErrorCode`` name of ``code`` (``"UNKNOWN"`` for a code not in the table)."""
    entry = ERROR_CODES.get(code)
    return entry[0] if entry else "UNKNOWN"


def error_for(code: int, what: str, *, as_class: type[ECTransferError] | None = None) -> ECTransferError:
    """The ectransfer error for Mooncake ``code`` returned while doing ``what``.

    ``what`` names the operation and key (``"get 'ns/k'"``). Codes not in the table become
    :class:`~ectransfer.errors.StorageIOError`; ``as_class`` overrides the table (``setup``
    failing for any reason means the store could not be joined).
    """
    name, cls = ERROR_CODES.get(code, ("UNKNOWN", StorageIOError))
    cls = as_class or cls
    hint = _HINTS.get(code)
    exc = cls(f"mooncake backend: {what} failed with Mooncake error {code} {name}" + (f" ({hint})" if hint else ""))
    # Attributes on an instance of the exact class: a subclass would not survive the
    # two-process harness, which rebuilds errors from the name of an ectransfer class.
    vars(exc).update(code=code, code_name=name)
    return exc
