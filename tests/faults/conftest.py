"""Fault-matrix plumbing: every backend target as a fixture (the recorder is tests/faults/report.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.targets import Target, all_targets


@pytest.fixture(params=sorted(all_targets()))
def target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    t = all_targets()[request.param](tmp_path_factory.mktemp(f"fault-{request.param}"))
    try:
        yield t
    finally:
        t.close()
