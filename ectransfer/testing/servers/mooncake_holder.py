"""A segment holder: a process that mounts memory into a Mooncake store and keeps it there.

    python -I .../mooncake_holder.py --master 127.0.0.1:PORT --segment-size BYTES \\
        --ready-file PATH [--metadata-server P2PHANDSHAKE] [--hostname 127.0.0.1]

Clients of a Mooncake store contribute no memory (``global_segment_size=0``); the entries live
in segments that processes like this one mount. It joins the store, writes ``PATH`` (atomically:
the file appears complete or not at all) once its segment is mounted, and stays until SIGTERM or
SIGINT, when it closes its client and exits. Setup failures exit with code 2 and a message on
stderr. In production, Mooncake's own ``mooncake_client`` program plays this part.

It imports nothing of ectransfer (so not torch either: seconds of start-up on a busy machine),
and is started by its file path, not with ``-m``, which would import the ``ectransfer`` package
(``-I`` keeps its directory, where the spawner module ``mooncake.py`` lives, off ``sys.path``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mooncake_holder.py")
    p.add_argument("--master", required=True, help="host:port of mooncake_master")
    p.add_argument("--segment-size", required=True, type=int, help="bytes of memory to mount")
    p.add_argument("--ready-file", required=True, type=Path, help="written once the segment is mounted")
    p.add_argument("--metadata-server", default="P2PHANDSHAKE")
    p.add_argument("--hostname", default="127.0.0.1", help="address clients reach this process at")
    p.add_argument("--protocol", default="tcp", choices=("tcp", "rdma"))
    args = p.parse_args(argv)
    segment = args.segment_size
    if segment <= 0:
        print(f"mooncake_holder: --segment-size must be positive, got {segment}", file=sys.stderr)
        return 2
    # Block the stop signals before Mooncake starts its threads, so they all inherit the mask
    # and sigwait below is the one place that receives them.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    from mooncake.store import MooncakeDistributedStore

    store = MooncakeDistributedStore()
    rc = store.setup(args.hostname, args.metadata_server, segment, 1 << 20, args.protocol, "", args.master)
    if rc != 0:
        print(f"mooncake_holder: setup against {args.master} failed with Mooncake error {rc}", file=sys.stderr)
        return 2
    tmp = args.ready_file.with_name(args.ready_file.name + ".tmp")
    tmp.write_text(f"{os.getpid()} {segment}\n")
    os.replace(tmp, args.ready_file)
    print(f"mooncake_holder: mounted {segment} bytes into {args.master}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    store.close()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: native transport libraries can crash in their exit handlers
    # (see the NIXL/libibverbs note); the client was closed above.
    os._exit(code)
