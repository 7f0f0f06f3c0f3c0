"""Fault-matrix plumbing: targets as a fixture, and a recorder for docs/reliability.md.

Every matrix test asks for ``observe`` and states what it saw (``observe("CorruptEntryError")``);
with ``ECTRANSFER_FAULT_REPORT=path`` the outcomes (passed / failed / skipped + reason) are
written as JSON at the end of the run, and ``scripts/render_reliability.py`` turns that JSON into
the table in docs/reliability.md. The table is therefore the suite's own results.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.targets import TARGETS, Target

_RESULTS: dict[str, dict[str, Any]] = {}


@pytest.fixture(params=sorted(TARGETS))
def target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    t = TARGETS[request.param](tmp_path_factory.mktemp(f"fault-{request.param}"))
    try:
        yield t
    finally:
        t.close()


@pytest.fixture
def observe(request: pytest.FixtureRequest) -> Callable[[str], None]:
    def _observe(text: str) -> None:
        request.node.user_properties.append(("observed", text))

    return _observe


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> None:
    marker = item.get_closest_marker("fault")
    if marker is None or call.when not in ("setup", "call"):
        return
    callspec = getattr(item, "callspec", None)
    backend = callspec.params.get("target", "?") if callspec else "?"
    fault = marker.args[0]
    key = f"{fault}|{backend}"
    if call.excinfo is not None and call.excinfo.errisinstance(pytest.skip.Exception):
        _RESULTS[key] = {"fault": fault, "backend": backend, "status": "n/a",
                         "observed": str(call.excinfo.value.msg), "test": item.nodeid}
    elif call.when == "call" or call.excinfo is not None:
        observed = "; ".join(v for k, v in item.user_properties if k == "observed")
        _RESULTS[key] = {"fault": fault, "backend": backend,
                         "status": "fail" if call.excinfo is not None else "pass",
                         "observed": observed or ("error" if call.excinfo else ""), "test": item.nodeid}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get("ECTRANSFER_FAULT_REPORT")
    if path and _RESULTS:
        Path(path).write_text(json.dumps(sorted(_RESULTS.values(), key=lambda r: (r["fault"], r["backend"])),
                                         indent=1) + "\n")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fault(name): a cell of the fault matrix (docs/reliability.md)")
