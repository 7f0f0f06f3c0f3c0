"""What the bench moves: item shape and dtype, how many, how many at once, on which device.

Items are random bytes (every bit pattern, NaNs included), so loaded items are compared bit
for bit (:func:`same_bits`), never with ``==``. Items are processed in *rounds* of at most
:data:`ROUND_BYTES` so memory stays bounded however large ``count`` is: a round allocates its
source and destination tensors once, and each item of a round is stamped with its global index
so no two saved items are alike (a backend that mixed up keys would fail verification).
"""

from __future__ import annotations

import dataclasses
import math

import torch

__all__ = ["DTYPES", "ROUND_BYTES", "WARMUP_ITEMS", "Workload", "same_bits", "scrub", "stamp"]

#: dtype names accepted by ``--dtype`` (with the short aliases people type)
DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float8_e4m3fn": torch.float8_e4m3fn, "fp8": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "uint8": torch.uint8, "int8": torch.int8,
}

#: the bytes of items one round holds in memory (sources; destinations and stored copies match)
ROUND_BYTES = 256 << 20
#: items saved and loaded (untimed) before measuring, per backend and kind
WARMUP_ITEMS = 2


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` have the same dtype, shape and bytes (NaN-safe)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


@dataclasses.dataclass(frozen=True)
class Workload:
    """The items of one bench run; every backend and kind moves exactly these."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    count: int
    concurrency: int
    device: str = "cpu"

    @property
    def item_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def round_size(self) -> int:
        """Items per round: bounded by :data:`ROUND_BYTES`, never below the concurrency."""
        by_memory = max(1, ROUND_BYTES // max(1, self.item_bytes))
        return min(self.count, max(self.concurrency, by_memory))

    def rounds(self) -> list[range]:
        """Global item indices, split into rounds."""
        size = self.round_size
        return [range(start, min(start + size, self.count)) for start in range(0, self.count, size)]

    def describe(self) -> str:
        name = str(self.dtype).removeprefix("torch.")
        return f"{self.count} items of {self.item_bytes:,} B ({name} {list(self.shape)})"

    def sources(self, n: int, seed: int = 0) -> list[torch.Tensor]:
        """``n`` distinct random items on the workload's device."""
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(n):
            raw = torch.randint(0, 256, (self.item_bytes,), dtype=torch.uint8, generator=g)
            out.append(raw.view(self.dtype).reshape(self.shape).to(self.device))
        return out

    def destinations(self, n: int) -> list[torch.Tensor]:
        """``n`` preallocated destination tensors (filled, so their pages are resident)."""
        return [torch.zeros(self.shape, dtype=self.dtype, device=self.device) for _ in range(n)]


def stamp(item: torch.Tensor, index: int) -> None:
    """Write ``index`` into the first bytes of ``item`` so every saved item is distinct."""
    flat = item.reshape(-1).view(torch.uint8)
    n = min(8, flat.numel())
    if n:
        stamp_bytes = torch.tensor(list(index.to_bytes(8, "little")[:n]), dtype=torch.uint8)
        flat[:n] = stamp_bytes.to(flat.device)


def scrub(outs: list[torch.Tensor]) -> None:
    """Overwrite destinations before a load, so a load that writes nothing fails verification."""
    for o in outs:
        o.reshape(-1).view(torch.uint8).fill_(0xA5)
