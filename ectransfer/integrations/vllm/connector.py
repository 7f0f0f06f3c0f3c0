"""``ECTransferConnector``: vLLM's ``ECConnectorBase`` over ectransfer's lifecycle core.

This class only translates: vLLM requests into :class:`~ectransfer.connector.scheduler.ItemSpec`,
scheduler outputs into :class:`~ectransfer.connector.plan.StepPlan`, worker results into
:class:`~ectransfer.connector.plan.WorkerReport`. Everything else lives in
:mod:`ectransfer.connector`, which never imports vLLM.

Hook map (vLLM 0.33): scheduler side — ``has_cache_item``, ``ensure_cache_available``,
``update_state_after_alloc``, ``build_connector_meta``, ``update_connector_output``,
``request_finished``, ``take_unavailable_requests``, ``has_pending_push_work``,
``get_ec_connector_stats``; worker side — ``start_load_caches``, ``save_caches``,
``start_save_caches``, ``get_finished``, ``build_connector_worker_meta``,
``start_worker_services``; both — ``shutdown``; front end — ``build_ec_connector_stats``,
``build_prom_metrics``.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

import torch
import vllm
from vllm.distributed.ec_transfer.ec_connector.base import (
    ECConnectorBase,
    ECConnectorMetadata,
    ECConnectorRole,
    ECConnectorWorkerMetadata,
)

from ectransfer.connector.channel import ChannelClient, ChannelServer, channel_address
from ectransfer.connector.options import Role, split_options
from ectransfer.connector.plan import ItemRef, StepPlan, WorkerReport
from ectransfer.connector.scheduler import ItemSpec, SchedulerSide
from ectransfer.connector.worker import WorkerSide
from ectransfer.errors import BackendConnectionError, ECTransferError, UnsupportedVersionError
from ectransfer.integrations.vllm.metrics import ECTransferPromMetrics, ECTransferStats
from ectransfer.keys import key_for_identifier

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import ECConnectorOutput
    from vllm.v1.request import Request

__all__ = ["ECTransferConnector", "ECTransferConnectorMetadata", "ECTransferWorkerMetadata"]

log = logging.getLogger(__name__)

MIN_VLLM = (0, 33, 0)


def _check_version(version: str) -> None:
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    if m is None or tuple(map(int, m.groups())) < MIN_VLLM:
        raise UnsupportedVersionError(
            f"ectransfer's vLLM connector needs vLLM >= {'.'.join(map(str, MIN_VLLM))} "
            f"(its ECConnectorBase hooks), found vLLM {version}; upgrade vLLM")


_check_version(vllm.__version__)


class ECTransferConnectorMetadata(ECConnectorMetadata):
    """Scheduler -> worker, once per step (pickled by vLLM)."""

    def __init__(self, plan: StepPlan) -> None:
        self.plan = plan


class ECTransferWorkerMetadata(ECConnectorWorkerMetadata):
    """Worker -> scheduler, once per step; merged across ranks."""

    def __init__(self, report: WorkerReport) -> None:
        self.report = report

    def aggregate(self, other: ECConnectorWorkerMetadata) -> ECConnectorWorkerMetadata:
        if not isinstance(other, ECTransferWorkerMetadata):
            return self
        return ECTransferWorkerMetadata(self.report.merge(other.report))


def _role_of(vllm_config: VllmConfig) -> Role:
    ec = vllm_config.ec_transfer_config
    assert ec is not None
    if ec.is_ec_producer and ec.is_ec_consumer:
        return Role.BOTH
    return Role.PRODUCER if ec.is_ec_producer else Role.CONSUMER


def _parallel_ranks() -> tuple[int, int]:
    """(tensor-parallel rank, pipeline-parallel rank) of this worker; (0, 0) outside vLLM's
    distributed setup (a single worker)."""
    try:
        from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank()), int(get_pp_group().rank_in_group)
    except (AssertionError, AttributeError, RuntimeError):
        return 0, 0


def _worker_device(vllm_config: VllmConfig) -> torch.device:
    configured = vllm_config.device_config.device
    device = configured if isinstance(configured, torch.device) else torch.device(str(configured or "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class ECTransferConnector(ECConnectorBase):
    """One connector for every ectransfer backend; configure it with ``ec_connector_extra_config``."""

    def __init__(self, vllm_config: VllmConfig, role: ECConnectorRole) -> None:
        super().__init__(vllm_config=vllm_config, role=role)
        ec = vllm_config.ec_transfer_config
        assert ec is not None
        self._ec_role = _role_of(vllm_config)
        self._options, self._transport = split_options(ec.ec_connector_extra_config)
        parallel = vllm_config.parallel_config
        self._tp_size = int(parallel.tensor_parallel_size)
        engine_id = str(ec.engine_id)
        dp_rank = int(getattr(parallel, "data_parallel_rank", 0) or 0)
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        self._server: ChannelServer | None = None
        self._resolver: Any = None  # vLLM's placeholder-metadata resolver, made on first use
        self._closed = False
        if role == ECConnectorRole.SCHEDULER:
            self._scheduler = self._make_scheduler_side(engine_id, dp_rank)
        else:
            tp_rank, pp_rank = _parallel_ranks()
            backend = self._transport.open(self._ec_role)
            self._worker = WorkerSide(
                backend, self._options,
                produce=self._ec_role.produces and tp_rank == 0,  # every rank holds the same output
                consume=self._ec_role.consumes,
                device=_worker_device(vllm_config),
                release_after_load=self._tp_size == 1,  # with TP the other ranks still read; the lease frees it
            )
            if self._ec_role.consumes and pp_rank == 0:  # only the first stage gathers embeddings
                self._server = ChannelServer(channel_address(engine_id, dp_rank, tp_rank), self._worker.handle)
        log.info("ectransfer connector (%s, %s): %s", role.name.lower(), self._ec_role.value,
                 self._transport.describe())

    def _make_scheduler_side(self, engine_id: str, dp_rank: int) -> SchedulerSide:
        backend = None
        if self._ec_role.consumes or self._options.skip_existing:
            # The scheduler only asks "is it there?": open the lookup side of the transport.
            backend = self._transport.open(Role.CONSUMER)
            if not type(backend).capabilities.peer_to_peer:  # peers come and go; stores must answer now
                try:
                    backend.exists(["ectransfer-startup-probe"])
                except ECTransferError as exc:
                    backend.close()
                    raise BackendConnectionError(
                        f"ectransfer: the {type(backend).name} backend ({backend.describe()}) is not reachable at "
                        f"start-up: {exc}") from exc
        channel = (ChannelClient([channel_address(engine_id, dp_rank, r) for r in range(self._tp_size)])
                   if self._ec_role.consumes else None)
        return SchedulerSide(backend, channel, self._ec_role, self._options, ranks=self._tp_size)

    # ================================================================ scheduler side
    def _sched(self) -> SchedulerSide:
        assert self._scheduler is not None, "scheduler-side hook called on a worker-side connector"
        return self._scheduler

    @staticmethod
    def _ref(request: Request, index: int) -> ItemRef:
        feature = request.mm_features[index]
        return ItemRef(feature.identifier, key_for_identifier(feature.identifier),
                       int(request.get_num_encoder_embeds(index)), str(feature.modality))

    def has_cache_item(self, identifier: str) -> bool:
        return self._sched().has_item(identifier, key_for_identifier(identifier))

    def ensure_cache_available(self, request: Request, num_computed_tokens: int) -> bool:
        announced = request.ec_transfer_params or {}
        specs = []
        for i, feature in enumerate(request.mm_features):
            pos = feature.mm_position
            specs.append(ItemSpec(self._ref(request, i), int(pos.offset), int(pos.offset + pos.length),
                                  has_media=feature.data is not None,
                                  announced=feature.identifier in announced))
        return self._sched().ensure_available(request.request_id, specs, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, index: int) -> None:
        self._sched().on_alloc(request.request_id, self._ref(request, index))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> ECConnectorMetadata:
        freed = getattr(scheduler_output, "free_encoder_mm_hashes", None) or ()
        return ECTransferConnectorMetadata(self._sched().build_plan(freed))

    def update_connector_output(self, connector_output: ECConnectorOutput) -> None:
        meta = connector_output.ec_connector_worker_meta
        if isinstance(meta, ECTransferWorkerMetadata):
            self._sched().on_worker_report(meta.report)

    def request_finished(self, request: Request) -> tuple[bool, dict[str, Any] | None]:
        self._sched().request_finished(request.request_id)
        if not self._ec_role.produces or not request.mm_features:
            return False, None
        from vllm.distributed.ec_transfer.ec_connector.utils import (
            PlaceholderMetadataResolver,
            collect_ec_item_metadata,
        )

        if self._resolver is None:
            self._resolver = PlaceholderMetadataResolver(self._vllm_config.model_config)
        items = collect_ec_item_metadata(request.mm_features, self._resolver)
        for item_id, entry in items.items():
            entry["ectransfer"] = {"key": key_for_identifier(item_id)}
        return False, items or None

    def take_unavailable_requests(self) -> set[str]:
        return self._sched().take_failed_requests()

    def has_pending_push_work(self) -> bool:
        return self._sched().has_pending_work()

    def get_ec_connector_stats(self) -> ECTransferStats | None:
        if self._scheduler is None:
            return None  # worker stats travel in the worker metadata (every runner delivers it)
        data = self._scheduler.take_stats()
        return ECTransferStats(data=data) if data else None

    @classmethod
    def build_ec_connector_stats(cls, data: dict[str, Any] | None = None) -> ECTransferStats | None:
        return ECTransferStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig, metric_types: Any, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> ECTransferPromMetrics:
        return ECTransferPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    # ================================================================ worker side
    def _work(self) -> WorkerSide:
        assert self._worker is not None, "worker-side hook called on a scheduler-side connector"
        return self._worker

    def start_worker_services(self) -> None:
        """The control channel already listens (it starts with the worker connector)."""

    def start_load_caches(self, encoder_cache: dict[str, torch.Tensor], **kwargs: Any) -> None:
        meta = self._connector_metadata
        if isinstance(meta, ECTransferConnectorMetadata) and meta.plan:
            self._work().load(meta.plan, encoder_cache)

    def save_caches(self, encoder_cache: dict[str, torch.Tensor], mm_hash: str, **kwargs: Any) -> None:
        worker = self._work()
        if worker.produce and mm_hash in encoder_cache:
            worker.save(mm_hash, key_for_identifier(mm_hash), encoder_cache[mm_hash])

    def start_save_caches(self, **kwargs: Any) -> None:
        """Nothing to prepare: every save starts in ``save_caches``."""

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        saved, loaded = self._work().finished()
        return saved or None, loaded or None

    def build_connector_worker_meta(self) -> ECConnectorWorkerMetadata | None:
        report = self._work().report()
        return ECTransferWorkerMetadata(report) if report is not None else None

    # ================================================================ both
    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        if self._worker is not None:
            self._worker.close()
        if self._scheduler is not None:
            self._scheduler.close()
