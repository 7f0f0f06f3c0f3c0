"""Raw baseline for the fsspec (S3) backend: plain s3fs ``pipe_file`` / ``cat_file``.

The same bytes, the same endpoint and credentials, nothing of ectransfer in between: no
codec, no checksum, no entry layout (objects go to ``<bucket>/<prefix>/raw/<name>``). s3fs
takes ``bytes`` only (botocore refuses memoryviews), so a write makes the one copy any s3fs
user makes; a read is one GET (``max_concurrency=1``: s3fs would otherwise HEAD each object
first to plan ranged reads) and one copy into the caller's buffer.
"""

from __future__ import annotations

from typing import Any

from ectransfer.backends.fsspec._config import accepts, config_from_url, make_filesystem
from ectransfer.bench.raw import RawClient

__all__ = ["Raw"]


class Raw(RawClient):
    def __init__(self, url: str, options: dict[str, Any]) -> None:
        super().__init__(url, options)
        cfg = config_from_url(url, {k: v for k, v in options.items() if k != "backend"})
        if cfg.protocol != "s3":
            raise ValueError(f"the raw s3fs baseline needs an s3:// URL, got protocol {cfg.protocol!r}")
        self.fs = make_filesystem(cfg)  # same endpoint, credentials, timeouts as the backend
        self.root = f"{cfg.root.rstrip('/')}/raw"
        self._cat_kwargs = {"max_concurrency": 1} if accepts(self.fs._cat_file, "max_concurrency") else {}

    def write(self, name: str, data: memoryview) -> None:
        self.fs.pipe_file(f"{self.root}/{name}", bytes(data))

    def read_into(self, name: str, out: memoryview) -> None:
        data = self.fs.cat_file(f"{self.root}/{name}", **self._cat_kwargs)
        if len(data) != len(out):
            raise ValueError(f"raw object {name!r} has {len(data)} bytes, expected {len(out)}")
        out[:] = data

    def delete(self, name: str) -> None:
        self.fs.rm_file(f"{self.root}/{name}")
