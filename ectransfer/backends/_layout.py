"""The on-storage layout shared by the path-based backends (fs, fsspec).

One entry per storage key, compatible with vLLM's ``ECExampleConnector``::

    <root>/[<namespace>/]<key>/encoder_cache.safetensors

so a directory written by the fs backend and a bucket written by the fsspec backend hold the
same entries under the same names (an S3 bucket mounted elsewhere, or synced with
``aws s3 sync``, is readable by either).
"""

from __future__ import annotations

import xxhash

__all__ = ["ENTRY_FILE", "MAX_NAME", "TMP_PREFIX", "entry_parts"]

#: the file (object) name of every entry
ENTRY_FILE = "encoder_cache.safetensors"
#: names of temporary files a writer renames over ``ENTRY_FILE`` start with this
TMP_PREFIX = ".tmp-"
#: longest path component kept as is (file names are limited to 255 bytes)
MAX_NAME = 200


def entry_parts(skey: str) -> list[str]:
    """The path components of the entry for storage key ``skey``, ``ENTRY_FILE`` last.

    Keys may be 256 characters, file names only 255 bytes: a longer part is shortened to a
    prefix plus its hash after ``~``, a character no key contains (so no collision).
    """
    parts = [p if len(p) <= MAX_NAME else f"{p[:MAX_NAME - 33]}~{xxhash.xxh3_128_hexdigest(p.encode())}"
             for p in skey.split("/")]
    parts.append(ENTRY_FILE)
    return parts
