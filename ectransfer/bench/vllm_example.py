"""``--vllm-example``: vLLM's own ``ECExampleConnector`` on the same directory and items.

The connector is built as vLLM builds it: a ``VllmConfig`` whose ``ECTransferConfig`` says
``ec_connector="ECExampleConnector"`` and ``ec_connector_extra_config={"shared_storage_path":
dir}``, one worker-role instance saving (``save_caches``) and one per loading thread
(``start_load_caches`` with connector metadata naming the item). Its load returns
``safetensors.torch.load_file``'s tensor, which on the CPU is a lazy memory map; the bench then
copies it into the preallocated destination inside the timed part, because vLLM copies the
embedding onward too and an unread map is not a loaded item. On CUDA it loads straight to the
device and the copy is device to device.

This is the only bench module that imports vLLM, and only when the flag is given.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Any

import torch

from ectransfer.bench.kinds import Subject

__all__ = ["VllmExampleSubject", "vllm_unavailable_reason"]


def vllm_unavailable_reason() -> str | None:
    """None if vLLM's example connector can be imported here, else why not (never raises)."""
    if not torch.cuda.is_available():
        # vLLM cannot infer a platform on a CPU-only host without this (see the vLLM notes).
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        from vllm.distributed.ec_transfer.ec_connector.example_connector import (  # noqa: F401
            ECExampleConnector,
        )
    except Exception as exc:  # noqa: BLE001 - any import failure means "skip, with the reason"
        return f"vLLM's ECExampleConnector cannot be imported ({type(exc).__name__}: {exc}); pip install 'ectransfer[vllm]'"
    return None


class VllmExampleSubject(Subject):
    """vLLM's ``ECExampleConnector`` saving and loading under ``root`` (same layout as fs)."""

    kind = "vllm-example"
    tag = "vx"

    def __init__(self, root: Path) -> None:
        from vllm.config import ECTransferConfig, VllmConfig
        from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorRole
        from vllm.distributed.ec_transfer.ec_connector.example_connector import (
            ECExampleConnector,
            ECExampleConnectorMetadata,
            MMMeta,
        )

        self.root = root
        self._role = ECConnectorRole.WORKER
        self._cls: Any = ECExampleConnector
        self._meta_cls: Any = ECExampleConnectorMetadata
        self._mm_meta: Any = MMMeta
        # "ec_both": vLLM refuses a producer-only config without a multimodal model, and no
        # model is needed to save and load (both hooks only read the storage path).
        self._config = VllmConfig(ec_transfer_config=ECTransferConfig(
            ec_connector="ECExampleConnector", ec_role="ec_both",
            ec_connector_extra_config={"shared_storage_path": str(root)}))
        self.producer = ECExampleConnector(self._config, self._role)
        # start_load_caches reads the metadata bound to its instance: one consumer per thread.
        self._local = threading.local()

    def _consumer(self) -> Any:
        c = getattr(self._local, "consumer", None)
        if c is None:
            c = self._local.consumer = self._cls(self._config, self._role)
        return c

    def save(self, key: str, item: torch.Tensor) -> None:
        self.producer.save_caches({key: item}, key)
        return None

    def load(self, key: str, out: torch.Tensor) -> None:
        consumer = self._consumer()
        meta = self._meta_cls()
        meta.add_mm_data(self._mm_meta.make_meta(key, out.shape[0] if out.dim() else 1))
        consumer.bind_connector_metadata(meta)
        cache: dict[str, torch.Tensor] = {}
        try:
            consumer.start_load_caches(cache)
        finally:
            consumer.clear_connector_metadata()
        out.copy_(cache[key])

    def forget(self, keys: list[str]) -> None:
        for k in keys:
            shutil.rmtree(self.root / k, ignore_errors=True)
