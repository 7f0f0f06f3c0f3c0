"""ectransfer for vLLM: one EC connector for every backend.

Two ways to use it, both needing only ``--ec-transfer-config``:

* by module path (no plugin)::

    {"ec_connector": "ECTransferConnector", "ec_connector_module_path": "ectransfer.integrations.vllm",
     "ec_role": "ec_consumer", "ec_connector_extra_config": {"url": "file:///mnt/ec"}}

* by name, through the ``vllm.general_plugins`` entry point ``ectransfer`` (installed with the
  package), which calls :func:`register`: then ``"ec_connector": "ECTransferConnector"`` is enough.

Importing this module imports neither vLLM nor any backend; the connector class is imported
on first attribute access (which is what vLLM's module-path route does).
"""

from __future__ import annotations

from typing import Any

__all__ = ["CONNECTOR_CLASS", "CONNECTOR_NAME", "ECTransferConnector", "register"]

CONNECTOR_NAME = "ECTransferConnector"
CONNECTOR_MODULE = "ectransfer.integrations.vllm.connector"
CONNECTOR_CLASS = "ECTransferConnector"


def register() -> None:
    """Register ``ECTransferConnector`` with vLLM's connector factory, lazily (module and class
    names only). Re-entrant: vLLM loads general plugins several times per process, and a name
    already registered — by us or by anyone else — is left as it is.
    """
    try:
        from vllm.distributed.ec_transfer.ec_connector.factory import ECConnectorFactory
    except ImportError:  # vLLM without EC transfer support: nothing to register into
        return
    try:
        ECConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_CLASS)
    except ValueError:
        pass  # already registered (this is a repeated plugin load)


def __getattr__(name: str) -> Any:
    if name in ("ECTransferConnector", "ECTransferConnectorMetadata", "ECTransferWorkerMetadata"):
        from ectransfer.integrations.vllm import connector

        return getattr(connector, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
