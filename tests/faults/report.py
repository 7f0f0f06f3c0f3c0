"""Pytest plugin recording fault-matrix cells for docs/reliability.md (loaded by tests/conftest.py).

A test marked ``@pytest.mark.fault("name")`` is one cell: its backend is the ``target`` (fault
matrix) or ``case`` (vLLM adapter) parameter. It states what it saw through the ``observe``
fixture (``observe("CorruptEntryError")``). With ``ECTRANSFER_FAULT_REPORT=path`` the outcomes
(pass / fail / n/a with the skip reason) are written as JSON at the end of the run, and
``scripts/render_reliability.py`` turns that JSON into the table in docs/reliability.md, which is
therefore the suites' own results.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

_RESULTS: dict[str, dict[str, Any]] = {}


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
    params = callspec.params if callspec else {}
    backend = str(params.get("target", params.get("case", "?")))
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
