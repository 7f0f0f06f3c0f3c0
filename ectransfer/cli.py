"""The ``ectransfer`` command: ``ectransfer backends`` lists every backend and its status."""

from __future__ import annotations

import argparse
import sys

from ectransfer import __version__
from ectransfer.registry import EXTRAS, available_backends, backend_class

__all__ = ["main"]


def _cmd_backends(args: argparse.Namespace) -> int:
    rows = available_backends()
    width = max(len(n) for n, _, _ in rows)
    for name, ok, why in rows:
        extra = f"[{EXTRAS[name]}]" if name in EXTRAS else ""
        caps = ""
        if ok:
            try:
                c = backend_class(name).capabilities
                flags = [f for f in ("shared_across_hosts", "persistent", "ttl", "zero_copy_device",
                                     "peer_to_peer") if getattr(c, f)]
                caps = "  (" + ", ".join(flags) + ")" if flags else ""
            except Exception:  # noqa: BLE001 - listed as available; capabilities are decoration
                caps = ""
        status = "available" if ok else f"unavailable: {why}"
        print(f"{name:<{width}}  {extra:<12} {status}{caps}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ectransfer", description="ectransfer: encoder-cache transport")
    parser.add_argument("--version", action="version", version=f"ectransfer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("backends", help="list every registered backend, whether it is available here and why not")
    p.set_defaults(func=_cmd_backends)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
