"""Wire codec: safetensors compatibility, checksums, and every malformed input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save

from ectransfer.codec import decode, encode, parse_header
from ectransfer.errors import CorruptEntryError, IncompatibleTensorError
from ectransfer.testing import DTYPES, MUTATIONS, make_tensor, same_bits


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_encoded_entry_is_plain_safetensors(dtype: torch.dtype) -> None:
    t = make_tensor((3, 5), dtype)
    blob = encode(t, "ns").to_bytes()
    loaded = load(blob)
    assert list(loaded) == ["ec_cache"]
    assert torch.equal(loaded["ec_cache"].view(torch.uint8), t.view(torch.uint8))


def test_foreign_safetensors_decode_without_checksum() -> None:
    t = make_tensor((4, 2), torch.bfloat16)
    blob = save({"ec_cache": t})
    assert parse_header(blob).checksum is None
    assert same_bits(decode(blob), t)


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_every_mutation_is_detected(mutation: str) -> None:
    blob = encode(make_tensor((8, 12), torch.bfloat16, seed=2)).to_bytes()
    out = torch.full((8, 12), 3, dtype=torch.bfloat16)
    before = out.clone()
    with pytest.raises(CorruptEntryError):
        decode(MUTATIONS[mutation](blob), out=out)
    assert torch.equal(out, before), "decode must not write into out before validating"


def test_namespace_mismatch_is_refused() -> None:
    blob = encode(torch.ones(3), "model-a").to_bytes()
    assert torch.equal(decode(blob, namespace="model-a"), torch.ones(3))
    with pytest.raises(CorruptEntryError, match="namespace"):
        decode(blob, namespace="model-b")


def test_unsupported_dtype_and_device() -> None:
    with pytest.raises(IncompatibleTensorError, match="complex"):
        encode(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(TypeError):
        encode([1, 2, 3])  # type: ignore[arg-type]


def test_encode_does_not_copy_payload() -> None:
    t = torch.arange(16, dtype=torch.float32)
    e = encode(t)
    t[0] = 42.0  # the payload is a view of the (contiguous) tensor's storage
    assert e.payload[:4].tobytes() == t[:1].numpy().tobytes()


def test_unknown_format_version_is_refused() -> None:
    blob = encode(torch.ones(2)).to_bytes().replace(b'"ectransfer.format":"1"', b'"ectransfer.format":"9"')
    with pytest.raises(CorruptEntryError, match="format version"):
        decode(blob)


_dtypes = st.sampled_from(DTYPES)
_shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)


@settings(max_examples=60, deadline=None)
@given(dtype=_dtypes, shape=_shapes, seed=st.integers(0, 1000), transpose=st.booleans())
def test_property_round_trip(dtype: torch.dtype, shape: tuple[int, ...], seed: int, transpose: bool) -> None:
    t = make_tensor(shape, dtype, seed)
    if transpose and t.dim() >= 2:
        t = t.transpose(0, -1)
    got = decode(encode(t, "p").to_bytes(), namespace="p")
    assert got.shape == t.shape and got.dtype == t.dtype
    assert torch.equal(got.contiguous().reshape(-1).view(torch.uint8), t.contiguous().reshape(-1).view(torch.uint8))


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_property_any_single_byte_change_is_detected(data: st.DataObject) -> None:
    blob = bytearray(encode(make_tensor((6, 10), torch.bfloat16, seed=1), "p").to_bytes())
    i = data.draw(st.integers(0, len(blob) - 1))
    delta = data.draw(st.integers(1, 255))
    original = blob[i]
    blob[i] ^= delta
    try:
        got = decode(bytes(blob), namespace="p")
    except CorruptEntryError:
        return
    # The only undetectable edits are JSON-insignificant header bytes (padding spaces, or a
    # character turned into equivalent whitespace): the decoded tensor must then be unchanged.
    assert chr(original) in " " or chr(blob[i]) in " \t\r\n", f"byte {i} changed undetected"
    assert same_bits(got, make_tensor((6, 10), torch.bfloat16, seed=1))


def test_deferred_checksum_sealed_in_pieces_equals_one_shot() -> None:
    from ectransfer.codec import PayloadVerifier

    t = make_tensor((300, 77), torch.bfloat16, seed=5)
    one_shot = encode(t, "ns")
    deferred = encode(t, "ns", defer_checksum=True)
    with pytest.raises(ValueError, match="seal"):
        deferred.to_bytes()
    c = deferred.checksum()
    for i in range(0, len(deferred.payload), 4096):
        c.update(deferred.payload[i:i + 4096])
    sealed = deferred.seal(c.value())
    assert len(sealed) == len(deferred.header) and sealed == one_shot.header
    header = parse_header(sealed)
    v = PayloadVerifier(header, namespace="ns")
    for i in range(0, len(deferred.payload), 1000):
        v.update(deferred.payload[i:i + 1000])
    v.finish()
    bad = PayloadVerifier(header, namespace="ns")
    bad.update(bytes(len(deferred.payload)))
    with pytest.raises(CorruptEntryError, match="checksum"):
        bad.finish()
    short = PayloadVerifier(header, namespace="ns")
    short.update(deferred.payload[:-1])
    with pytest.raises(CorruptEntryError, match="truncated"):
        short.finish()
    with pytest.raises(CorruptEntryError, match="namespace"):
        PayloadVerifier(header, namespace="other")


@pytest.mark.parametrize("align", [64, 4096])
def test_aligned_payload_still_reads_with_safetensors(align: int) -> None:
    from safetensors.torch import load

    t = make_tensor((33, 65), torch.float16, seed=6)
    entry = encode(t, align=align)
    assert len(entry.header) % align == 0
    assert same_bits(load(entry.to_bytes())["ec_cache"], t)
    assert same_bits(decode(entry.to_bytes()), t)


@pytest.mark.parametrize("beside", [False, True], ids=["hash-inline", "hash-beside"])
@pytest.mark.parametrize("deferred", [False, True])
@pytest.mark.parametrize("shape", [(0,), (7, 3), (1100, 1000)])  # empty, tiny, more than one COPY_PIECE
def test_copy_into_writes_the_entry_with_its_checksum(deferred: bool, shape: tuple[int, ...], beside: bool) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from ectransfer.codec import COPY_PIECE

    t = make_tensor(shape, torch.float16, seed=7)
    entry = encode(t, "ns", align=256, defer_checksum=deferred)
    view = np.full(entry.nbytes + 5, 0xAB, dtype=np.uint8)
    with ThreadPoolExecutor(2) as pool:
        header = entry.copy_into(view, pool if beside else None)
    if shape == (1100, 1000):
        assert len(entry.payload) > COPY_PIECE
    assert header == encode(t, "ns", align=256).header  # sealed: the same checksum as one shot
    assert bytes(view[:entry.nbytes]) == header + bytes(entry.payload)
    assert bytes(view[entry.nbytes:]) == b"\xab" * 5  # nothing written past the entry
    assert same_bits(decode(bytes(view[:entry.nbytes]), namespace="ns"), t)
    with pytest.raises(ValueError, match="does not fit"):
        entry.copy_into(np.zeros(entry.nbytes - 1, dtype=np.uint8))
