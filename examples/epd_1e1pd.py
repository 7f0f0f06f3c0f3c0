#!/usr/bin/env python3
"""1E1PD on one machine, on a CPU: a vLLM encoder process saves, a vLLM prefill/decode process loads.

    python examples/epd_1e1pd.py                          # fs backend in a temporary directory
    python examples/epd_1e1pd.py --url redis://127.0.0.1:6379/0
    python examples/epd_1e1pd.py --spawn redis            # start a local redis-server for the run

Both sides are vLLM 0.33's real scheduler and EC connector hooks with ectransfer's connector
(``ectransfer.testing.vllm`` stands in for the model runner, which vLLM's PyPI wheel cannot build
on a CPU: "encoding" an image yields a tensor derived from its hash). The encoder process encodes
three images and prints each response's ``ec_transfer_params``; this process, the consumer,
receives the requests as vLLM's EPD proxy would forward them (two announced by the encoder, one
it never saw), loads the first two through the backend, encodes the third itself, and checks
what arrived bit for bit.

The real deployment commands (``vllm serve ... --ec-transfer-config``) are in docs/vllm.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from ectransfer.testing.vllm import (
    Engine,
    embedding_for,
    make_request,
    read_result,
    use_cpu_env,
    vllm_config,
    write_tiny_model,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="backend URL (default: a temporary fs directory)")
    parser.add_argument("--spawn", metavar="BACKEND", help="start a local server for BACKEND and use it")
    args = parser.parse_args()
    use_cpu_env()
    with tempfile.TemporaryDirectory(prefix="ectransfer-epd-") as tmp:
        work = Path(tmp)
        server = None
        if args.spawn:
            from ectransfer.testing.servers import spawner

            spawn = spawner(args.spawn)
            if spawn is None:
                parser.error(f"no local server to spawn for {args.spawn!r}")
            server = spawn(work / "server")
            extra = {"url": server.url, **server.options}
        else:
            extra = {"url": args.url or f"file://{work / 'ec'}"}
        try:
            return run(work, extra)
        finally:
            if server is not None:
                server.stop()


def run(work: Path, extra: dict[str, object]) -> int:
    model = str(write_tiny_model(work / "model"))
    spec = work / "producer.json"
    spec.write_text(json.dumps({"model": model, "extra": extra}))
    print(f"encoder: starting a vLLM producer process ({extra['url']})")
    producer = subprocess.Popen([sys.executable, "-m", "ectransfer.testing.vllm", "producer", str(spec)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert producer.stdin is not None and producer.stdout is not None
    producer.stdin.write(json.dumps({"requests": [{"id": "enc-1", "items": ["img-cat", "img-dog"]}]}) + "\n")
    producer.stdin.flush()
    answer = read_result(producer.stdout, timeout_s=300)
    print(f"encoder: encoded and saved {answer['encoded']}")
    params = answer["ec_transfer_params"]["enc-1"]

    engine = Engine(vllm_config(model, "ec_consumer", extra))
    try:
        engine.add(make_request("pd-1", ["img-cat", "img-dog"], ec_params=params))
        engine.add(make_request("pd-2", ["img-bird"]))
        engine.run()
        ok = True
        for item in ("img-cat", "img-dog", "img-bird"):
            how = "encoded here" if item in engine.encoded else "loaded through ectransfer"
            exact = bool((engine.gathered[item] == embedding_for(item)).all())
            ok &= exact
            print(f"consumer: {item}: {how}, bit-exact={exact}")
        for rid, out in sorted(engine.finished.items()):
            print(f"consumer: request {rid} finished: {out.finish_reason.name.lower()}")
        stats = engine.scheduler.ec_connector.get_ec_connector_stats()
        if stats is not None or engine.stats:
            from ectransfer.connector.stats import merge_stats, summarize

            data: dict[str, object] = {}
            for s in [*engine.stats, *([stats.data] if stats is not None else [])]:
                data = merge_stats(data, s)  # type: ignore[arg-type]
            print("consumer: stats:", summarize(data))  # type: ignore[arg-type]
        ok &= engine.encoded == ["img-bird"]
    finally:
        engine.close()
        producer.stdin.close()
        producer.wait(60)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
