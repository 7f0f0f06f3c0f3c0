#!/usr/bin/env python3
"""Render the fault matrix JSON (ECTRANSFER_FAULT_REPORT) as the table in docs/reliability.md.

Usage: ECTRANSFER_FAULT_REPORT=/tmp/faults.json pytest tests/faults tests/vllm
       python scripts/render_reliability.py /tmp/faults.json docs/reliability.md
Everything between the BEGIN/END markers in the doc is replaced; the rest is kept.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BEGIN, END = "<!-- BEGIN FAULT MATRIX -->", "<!-- END FAULT MATRIX -->"
ICON = {"pass": "✅", "fail": "❌", "n/a": "—"}


def render(rows: list[dict[str, str]]) -> str:
    backends = sorted({r["backend"] for r in rows})
    faults = list(dict.fromkeys(r["fault"] for r in rows))
    cell = {(r["fault"], r["backend"]): r for r in rows}
    out = ["| fault | " + " | ".join(backends) + " |", "|---|" + "---|" * len(backends)]
    for f in faults:
        cells = []
        for b in backends:
            r = cell.get((f, b))
            if r is None:
                cells.append(" ")
            else:
                text = r["observed"].replace("|", "/").replace("\n", " ")
                cells.append(f"{ICON[r['status']]} {text}")
        out.append(f"| {f} | " + " | ".join(cells) + " |")
    tests = sorted({r["test"].split("[")[0] for r in rows})
    out += ["", "Tests behind the rows: " + ", ".join(f"`{t}`" for t in tests)]
    return "\n".join(out)


def main() -> int:
    rows = json.loads(Path(sys.argv[1]).read_text())
    doc = Path(sys.argv[2])
    text = doc.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{render(rows)}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
