"""No code path deserialises data from a backend (or a peer) with pickle or anything like it.

Entries are safetensors (parsed by our codec), control messages msgpack without extension
hooks. This scans the package's source, so a new ``pickle.loads`` or ``torch.load`` anywhere in
``ectransfer/`` fails here with the file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "ectransfer"

#: modules whose mere import in our code means unpickling is possible
FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
#: attribute calls that unpickle (module alias → attribute)
FORBIDDEN_CALLS = {("torch", "load"), ("numpy", "load"), ("np", "load"), ("pandas", "read_pickle")}


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in FORBIDDEN_MODULES:
                    found.append(f"{path}:{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in FORBIDDEN_MODULES:
            found.append(f"{path}:{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            if isinstance(owner, ast.Name) and (owner.id, node.func.attr) in FORBIDDEN_CALLS:
                found.append(f"{path}:{node.lineno}: {owner.id}.{node.func.attr}(...)")
            if node.func.attr in ("unpackb", "Unpacker") and any(
                    kw.arg in ("ext_hook", "object_hook", "object_pairs_hook") for kw in node.keywords):
                found.append(f"{path}:{node.lineno}: msgpack {node.func.attr} with an object hook")
    return found


def test_sources_are_scanned() -> None:
    names = {p.name for p in _sources()}
    assert {"codec.py", "backend.py", "channel.py", "remote.py"} <= names


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_unpickling(path: Path) -> None:
    assert _violations(path) == []


def test_the_scan_catches_what_it_looks_for(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nimport torch\nimport msgpack\n"
                   "x = torch.load('f')\ny = msgpack.unpackb(b'', ext_hook=print)\n")
    assert len(_violations(bad)) == 3
