"""The fs baseline: a plain file write of the item's bytes, and a read into the destination.

No header, no checksum, no temporary file and rename, no directory per entry: the least any
file-based transport must do to move the same bytes (``<root>/<name>.raw``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from ectransfer.bench.raw import RawClient

__all__ = ["Raw"]


class Raw(RawClient):
    """``os.write`` the bytes to a file; ``os.preadv`` them back into the caller's buffer."""

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        super().__init__(url, options)
        path = unquote(urlsplit(url).path) if "://" in url else url.partition("?")[0]
        self.root = Path(os.path.abspath(os.path.expanduser(path)))
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> str:
        return str(self.root / f"{name}.raw")

    def write(self, name: str, data: memoryview) -> None:
        fd = os.open(self._path(name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = data.cast("B")
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)

    def read_into(self, name: str, out: memoryview) -> None:
        fd = os.open(self._path(name), os.O_RDONLY)
        try:
            view = out.cast("B")
            got = 0
            while got < len(view):
                n = os.preadv(fd, [view[got:]], got)
                if n == 0:
                    raise OSError(f"{self._path(name)} is shorter than {len(view)} bytes")
                got += n
        finally:
            os.close(fd)

    def delete(self, name: str) -> None:
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            pass
