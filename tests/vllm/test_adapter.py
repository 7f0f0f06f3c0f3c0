"""ECTransferConnector driven by vLLM 0.33's real Scheduler and worker mixin.

Producer and consumer run in separate processes: the producer (``ectransfer.testing.vllm``) is a
vLLM encode-only instance that encodes and saves; the consumer is this process, a scheduler
plus the EC part of a model runner. Every test runs against every backend with a real store.
"""

from __future__ import annotations

from typing import Any

import pytest

from ectransfer.testing import same_bits
from ectransfer.testing.vllm import Engine, embedding_for, make_request, vllm_config
from tests.vllm.conftest import Case

pytestmark = pytest.mark.vllm


def consumer(model: str, case: Case, **extra: Any) -> Engine:
    return Engine(vllm_config(model, "ec_consumer", {**case.extra, **extra}))


def test_saved_item_loads_bit_exact_and_miss_encodes_locally(case: Case, tiny_model: str) -> None:
    produced = case.produce(tiny_model, [{"id": "p-1", "items": ["img-hit"]}])
    assert produced["encoded"] == ["img-hit"]
    params = produced["ec_transfer_params"]["p-1"]
    assert params["img-hit"]["ectransfer"] == {"key": "img-hit"}

    engine = consumer(tiny_model, case)
    try:
        engine.add(make_request("r-hit", ["img-hit"], ec_params=params))
        engine.add(make_request("r-miss", ["img-never-saved"]))
        engine.run()
        assert "img-hit" not in engine.encoded, "a saved item must load, not use the local encoder"
        assert engine.encoded == ["img-never-saved"], "a miss is encoded locally"
        assert all("r-hit" not in s for s in engine.scheduled_encoder_inputs)
        assert same_bits(engine.gathered["img-hit"], embedding_for("img-hit")), "not bit-exact"
        assert {r: o.finish_reason.name for r, o in engine.finished.items()} == {"r-hit": "LENGTH",
                                                                                 "r-miss": "LENGTH"}
        counters = _counters(engine)
        assert counters["loads"] == 1 and counters["fetches"] == 1 and counters["lookup_misses"] >= 1
        connector = engine.scheduler.ec_connector
        assert connector._scheduler.tracked_items == 0
    finally:
        engine.close()


def test_item_is_fetched_while_no_token_is_scheduled(case: Case, tiny_model: str) -> None:
    """The only request waits for its item: steps schedule nothing, the fetch must still happen."""
    produced = case.produce(tiny_model, [{"id": "p-lonely", "items": ["img-lonely"]}])
    engine = consumer(tiny_model, case)
    try:
        engine.add(make_request("r-1", ["img-lonely"], ec_params=produced["ec_transfer_params"]["p-lonely"]))
        engine.run()
        assert engine.encoded == []
        assert same_bits(engine.gathered["img-lonely"], embedding_for("img-lonely"))
    finally:
        engine.close()


@pytest.mark.parametrize("media", [
    pytest.param(True, id="with-media", marks=pytest.mark.fault("vLLM: corrupt item, request has its media")),
    pytest.param(False, id="without-media", marks=pytest.mark.fault("vLLM: corrupt item, request has no media")),
])
def test_corrupt_item_is_never_served(case: Case, tiny_model: str, media: bool, observe: Any) -> None:
    bad, good = f"img-bad-{media}", f"img-good-{media}"
    produced = case.produce(tiny_model, [{"id": f"p-corrupt-{media}", "items": [bad, good]}])
    case.corrupt(bad, "flipped_payload_byte")
    params = produced["ec_transfer_params"][f"p-corrupt-{media}"]

    engine = consumer(tiny_model, case)
    try:
        without = () if media else (bad,)
        engine.add(make_request("r-bad", [bad], ec_params=params, without_media=without))
        engine.add(make_request("r-good", [good], ec_params=params))
        engine.run()
        assert engine.finished["r-good"].finish_reason.name == "LENGTH", "other requests keep being served"
        assert same_bits(engine.gathered[good], embedding_for(good))
        if media:
            assert engine.encoded == [bad], "the corrupt item is re-encoded locally"
            assert engine.finished["r-bad"].finish_reason.name == "LENGTH"
            assert same_bits(engine.gathered[bad], embedding_for(bad))
        else:
            assert engine.finished["r-bad"].finish_reason.name == "ERROR"
            assert bad not in engine.gathered
        # The scheduler's own counter: the worker's fetch_corrupt reaches the scheduler only with
        # the next step that schedules tokens, which may come after this point.
        assert _counters(engine)["items_failed_corrupt"] == 1
        # the engine keeps serving after the failure
        engine.add(make_request("r-after", [good], ec_params=params))
        engine.run()
        assert engine.finished["r-after"].finish_reason.name == "LENGTH"
        from vllm.distributed.ec_transfer import get_ec_transfer

        assert get_ec_transfer()._worker.staged_bytes == 0, "staging leaked"
        assert engine.scheduler.ec_connector._scheduler.tracked_items == 0
        observe(("re-encoded locally" if media else "its request ended FINISHED_ERROR")
                + "; other requests served; nothing leaked")
    finally:
        engine.close()


@pytest.mark.fault("vLLM: announced item never arrives")
def test_announced_item_that_never_arrives_fails_cleanly(case: Case, tiny_model: str, observe: Any) -> None:
    """A proxy forwarded params for an item the store does not have: no hang, no crash."""
    engine = consumer(tiny_model, case, load_timeout_s=2.0)
    try:
        ghost = {"img-ghost": {"modality": "image", "item_indices": [0], "metadata": {}}}
        engine.add(make_request("r-ghost", ["img-ghost"], ec_params=ghost, without_media=("img-ghost",)))
        engine.add(make_request("r-ok", ["img-local"]))
        engine.run(timeout_s=60)
        assert engine.finished["r-ghost"].finish_reason.name == "ERROR"
        assert engine.finished["r-ok"].finish_reason.name == "LENGTH"
        observe("FINISHED_ERROR after load_timeout_s; other requests served")
    finally:
        engine.close()


def test_producer_does_not_reencode_what_the_store_has(case: Case, tiny_model: str) -> None:
    if case.peer_to_peer:
        pytest.skip(f"{case.name}: a producer serves only what it encoded itself")
    from ectransfer.connector.options import Role, split_options

    with split_options(case.extra)[1].open(Role.PRODUCER) as other_producer:  # saved by another encoder
        other_producer.put("img-elsewhere", embedding_for("img-elsewhere"))
    produced = case.produce(tiny_model, [{"id": "p-skip", "items": ["img-elsewhere", "img-new"]}])
    assert produced["encoded"] == ["img-new"]


def _counters(engine: Engine) -> dict[str, float]:
    from ectransfer.connector.stats import merge_stats

    data: dict[str, Any] = {}
    for s in engine.stats:
        data = merge_stats(data, s)
    # the last interval may still sit in the connector
    tail = engine.scheduler.ec_connector.get_ec_connector_stats()
    if tail is not None:
        data = merge_stats(data, tail.data)
    return dict(data.get("counters", {}))


@pytest.mark.fault("vLLM: store down at start-up")
def test_backend_down_at_start_is_a_clear_error(case: Case, tiny_model: str, observe: Any) -> None:
    if not case.target.has_server:
        pytest.skip(f"{case.name} has no server to be down")
    if case.peer_to_peer:
        pytest.skip(f"{case.name}: a consumer may start before its producers; lookups then miss")
    url, options = case.target.unreachable_url()
    from vllm.distributed.ec_transfer import ensure_ec_transfer_shutdown

    from ectransfer import BackendConnectionError, TransferTimeoutError

    with pytest.raises((BackendConnectionError, TransferTimeoutError)) as info:
        Engine(vllm_config(tiny_model, "ec_consumer", {"url": url, **options, "timeout_s": 3.0}))
    ensure_ec_transfer_shutdown()
    text = str(info.value)
    assert "not reachable" in text or "connect" in text.lower() or "timed out" in text.lower(), text
    observe(f"start-up fails: {type(info.value).__name__}")

