"""fs backend on a full filesystem: a typed error, the old entry intact, nothing half-written."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ectransfer import CapacityError, open_backend


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a 2 MiB tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.fault("disk full")
@pytest.mark.parametrize("target", ["fs"])
def test_disk_full(small_tmpfs: Path, observe: Any, target: str) -> None:
    with open_backend(str(small_tmpfs)) as be:
        old = torch.full((256, 1024), 7, dtype=torch.uint8)  # 256 KiB
        be.put("k", old)
        with pytest.raises(CapacityError, match="no space"):
            be.put("k", torch.zeros(4 << 20, dtype=torch.uint8))  # 4 MiB > 2 MiB filesystem
        assert torch.equal(be.get("k"), old), "the previous entry must survive a failed overwrite"
        with pytest.raises(CapacityError):
            be.put("new", torch.zeros(4 << 20, dtype=torch.uint8))
        assert be.exists(["new"]) == [False], "a failed write must not leave a readable entry"
        leftovers = [p.name for p in small_tmpfs.rglob("*") if p.is_file() and p.name.startswith(".tmp-")]
        assert not leftovers, f"temporary files left behind: {leftovers}"
    observe("CapacityError; old entry intact; no partial entry or temp file")
