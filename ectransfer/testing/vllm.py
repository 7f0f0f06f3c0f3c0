"""Drive vLLM 0.33's real Scheduler and EC worker mixin on a CPU, with no model runner.

Used by ectransfer's own adapter tests and by ``examples/epd_1e1pd.py``; a third-party backend
can run its store through vLLM's lifecycle the same way. Needs vLLM installed.

vLLM's model runner cannot be built on a CPU wheel, so :class:`Engine` does, around the real
scheduler and the real connector, exactly what ``GPUModelRunner.execute_model`` does with the
EC connector (vLLM 0.33):

* an encode-only instance (producer, not consumer) always enters the EC context, encodes the
  scheduled items, calls ``maybe_save_ec_to_connector`` for each and returns an empty output —
  **without** the EC output (vLLM drops it on that path, and so do we);
* any other instance runs no worker code at all in a step with no scheduled tokens;
* otherwise it enters the EC context (``start_load_caches``), encodes the scheduled items, then
  gathers the embeddings of every scheduled token range, raising ``Encoder cache miss`` like
  vLLM when an item is not in the encoder cache.

"Encoding" an item produces :func:`embedding_for` (deterministic per ``mm_hash``), so another
process can check what arrived bit for bit. Also runnable as ``python -m ectransfer.testing.vllm
producer SPEC.json``: a producer process that encodes requests and saves their items
(see :func:`_produce`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import xxhash

ENV = {"VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def use_cpu_env() -> None:
    """Set :data:`ENV` (unless already set); vLLM reads it when first imported."""
    for k, v in ENV.items():
        os.environ.setdefault(k, v)

RESULT_PREFIX = "ectransfer-producer-result: "  # native libraries also write to stdout
IMAGE_TOKEN = 4  # "<image>" in the tiny model's vocabulary
EMBEDS = 4  # BLIP-2 num_query_tokens: embeddings per image
HIDDEN = 64  # the tiny model's text hidden size


def write_tiny_model(d: Path) -> Path:
    """A BLIP-2 config + tokenizer + processor (no weights: nothing here loads the model)."""
    use_cpu_env()
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        Blip2Config,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
        PreTrainedTokenizerFast,
    )

    specials = ["<pad>", "</s>", "<s>", "<unk>", "<image>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(528)])}
    wl = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast: Any = PreTrainedTokenizerFast  # transformers' classes are untyped
    processor: Any = Blip2Processor
    tok = fast(tokenizer_object=wl, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    cfg = Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=28, patch_size=14).to_dict(),
        qformer_config=Blip2QFormerConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, encoder_hidden_size=32).to_dict(),
        text_config=OPTConfig(vocab_size=len(vocab), hidden_size=HIDDEN, ffn_dim=128, num_hidden_layers=2,
                              num_attention_heads=2, word_embed_proj_dim=HIDDEN, max_position_embeddings=2048,
                              bos_token_id=2, eos_token_id=1, pad_token_id=0).to_dict(),
        num_query_tokens=EMBEDS, image_token_index=IMAGE_TOKEN)
    cfg.architectures = ["Blip2ForConditionalGeneration"]
    cfg.save_pretrained(d)
    tok.save_pretrained(d)
    processor(image_processor=BlipImageProcessor(size={"height": 28, "width": 28}), tokenizer=tok,
                   num_query_tokens=EMBEDS).save_pretrained(d)
    return d


def embedding_for(mm_hash: str) -> torch.Tensor:
    """What "encoding" item ``mm_hash`` yields, in every process."""
    g = torch.Generator().manual_seed(xxhash.xxh3_64_intdigest(mm_hash.encode()) & (2**63 - 1))
    return torch.randn(EMBEDS, HIDDEN, generator=g)


def vllm_config(model_dir: str, role: Any, extra: dict[str, Any], *, module_path: bool = True,
                engine_id: str | None = None) -> Any:
    use_cpu_env()
    from vllm.config import CacheConfig, ECTransferConfig, ModelConfig, SchedulerConfig, VllmConfig

    ec = ECTransferConfig(ec_connector="ECTransferConnector", ec_role=role, ec_connector_extra_config=extra,
                          ec_connector_module_path="ectransfer.integrations.vllm" if module_path else None,
                          engine_id=engine_id)
    mc = ModelConfig(model=model_dir, dtype="float32", seed=42, max_model_len=512)
    vc = VllmConfig(model_config=mc, ec_transfer_config=ec,
                    scheduler_config=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512, max_model_len=512,
                                                     enable_chunked_prefill=True, is_encoder_decoder=False),
                    cache_config=CacheConfig(block_size=16, gpu_memory_utilization=0.9, cache_dtype="auto",
                                             enable_prefix_caching=True))
    vc.cache_config.num_gpu_blocks = 1000
    return vc


_HASHER: Any = None


def make_request(req_id: str, mm_hashes: list[str], *, ec_params: dict[str, Any] | None = None,
                 without_media: tuple[str, ...] = (), max_tokens: int = 3) -> Any:
    """A prompt with one 4-token image placeholder per item (2 text tokens before each)."""
    global _HASHER
    from vllm.multimodal.inputs import MultiModalFeatureSpec, MultiModalKwargsItem, PlaceholderRange
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    if _HASHER is None:
        init_none_hash(sha256)
        _HASHER = get_request_block_hasher(16, sha256)
    tokens: list[int] = []
    features = []
    for h in mm_hashes:
        tokens += [10 + len(tokens) % 100, 11]
        features.append(MultiModalFeatureSpec(
            data=None if h in without_media else MultiModalKwargsItem.dummy(), modality="image", identifier=h,
            mm_position=PlaceholderRange(offset=len(tokens), length=EMBEDS)))
        tokens += [IMAGE_TOKEN] * EMBEDS
    tokens += [12, 13, 14, 15]
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                        extra_args={"ec_transfer_params": ec_params} if ec_params else None)
    sp.update_from_generation_config({}, 1)
    return Request(request_id=req_id, prompt_token_ids=tokens, sampling_params=sp, pooling_params=None,
                   mm_features=features, block_hasher=_HASHER)


@dataclass
class Engine:
    """A real vLLM Scheduler plus the EC part of a model runner, in this process."""

    config: Any
    scheduler: Any = None
    cache: dict[str, torch.Tensor] = field(default_factory=dict)
    encoded: list[str] = field(default_factory=list)  # items encoded locally, in order
    gathered: dict[str, torch.Tensor] = field(default_factory=dict)  # what each gather found
    finished: dict[str, Any] = field(default_factory=dict)  # request id -> EngineCoreOutput
    scheduled_encoder_inputs: list[dict[str, list[int]]] = field(default_factory=list)
    stats: list[dict[str, Any]] = field(default_factory=list)
    saved: set[str] = field(default_factory=set)  # finished_sending seen by the runner

    def __post_init__(self) -> None:
        from vllm.distributed.ec_transfer import ensure_ec_transfer_initialized
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
        from vllm.v1.structured_output import StructuredOutputManager

        ensure_ec_transfer_initialized(self.config)  # the worker (vLLM builds it before the scheduler)
        kv = KVCacheConfig(num_blocks=1000, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(
            ["layer"], FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=1, dtype=torch.float32))])
        self.scheduler = Scheduler(vllm_config=self.config, kv_cache_config=kv, block_size=16, log_stats=True,
                                   structured_output_manager=StructuredOutputManager(self.config))

    def add(self, request: Any) -> None:
        self.scheduler.add_request(request)

    def _encode(self, so: Any) -> None:
        from vllm.v1.worker.ec_connector_model_runner_mixin import ECConnectorModelRunnerMixin as Mixin

        for req_id, indices in so.scheduled_encoder_inputs.items():
            request = self.scheduler.requests[req_id]
            for i in indices:
                feature = request.mm_features[i]
                if feature.data is None:  # vLLM's runner skips media it does not have
                    continue
                self.cache[feature.identifier] = embedding_for(feature.identifier)
                self.encoded.append(feature.identifier)
                Mixin.maybe_save_ec_to_connector(self.cache, feature.identifier)

    def _gather(self, so: Any) -> None:
        for req_id, n in so.num_scheduled_tokens.items():
            request = self.scheduler.requests[req_id]
            end = request.num_computed_tokens
            start = end - n
            for feature in request.mm_features:
                pos = feature.mm_position
                if pos.offset < end and start < pos.offset + pos.length:
                    if feature.identifier not in self.cache:
                        raise RuntimeError(f"Encoder cache miss for {feature.identifier}.")
                    self.gathered[feature.identifier] = self.cache[feature.identifier].clone()

    def step(self) -> None:
        from vllm.distributed.ec_transfer import get_ec_transfer
        from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput, make_empty_encoder_model_runner_output
        from vllm.v1.worker.ec_connector_model_runner_mixin import ECConnectorModelRunnerMixin as Mixin

        so = self.scheduler.schedule()
        self.scheduled_encoder_inputs.append(dict(so.scheduled_encoder_inputs))
        for h in so.free_encoder_mm_hashes:
            self.cache.pop(h, None)
        if not get_ec_transfer().is_consumer:
            with Mixin.maybe_get_ec_connector_output(so, encoder_cache=self.cache) as ec_out:
                self._encode(so)
            self.saved |= (ec_out.finished_sending if ec_out is not None else None) or set()
            mro = make_empty_encoder_model_runner_output(so)  # vLLM 0.33 returns it without ec_out
        elif not so.total_num_scheduled_tokens:
            mro = EMPTY_MODEL_RUNNER_OUTPUT
        else:
            with Mixin.maybe_get_ec_connector_output(so, encoder_cache=self.cache) as ec_out:
                self._encode(so)
                self._gather(so)
            ids = list(so.num_scheduled_tokens)
            mro = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                    sampled_token_ids=[[7] for _ in ids], ec_connector_output=ec_out)
        outs = self.scheduler.update_from_output(so, mro)
        for eco in outs.values():
            for out in eco.outputs:
                if out.finish_reason is not None:
                    self.finished[out.request_id] = out
            if eco.scheduler_stats is not None and eco.scheduler_stats.ec_connector_stats:
                self.stats.append(eco.scheduler_stats.ec_connector_stats)

    def run(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.scheduler.has_requests():
            if time.monotonic() > deadline:
                raise TimeoutError(f"requests still unfinished after {timeout_s} s: {list(self.scheduler.requests)}")
            self.step()
            time.sleep(0.001)

    def wait_saved(self, items: set[str], timeout_s: float = 30.0) -> None:
        """Step the (producer) worker until every item's save is reported finished."""
        from vllm.v1.core.sched.output import SchedulerOutput
        from vllm.v1.worker.ec_connector_model_runner_mixin import ECConnectorModelRunnerMixin as Mixin

        deadline = time.monotonic() + timeout_s
        while not items <= self.saved:
            if time.monotonic() > deadline:
                raise TimeoutError(f"saves not finished after {timeout_s} s: {sorted(items - self.saved)}")
            so = SchedulerOutput.make_empty()
            so.ec_connector_metadata = self.scheduler.ec_connector.build_connector_meta(so)
            with Mixin.maybe_get_ec_connector_output(so, encoder_cache=self.cache) as ec_out:
                pass
            self.saved |= (ec_out.finished_sending if ec_out is not None else None) or set()
            time.sleep(0.01)

    def close(self) -> None:
        from vllm.distributed.ec_transfer import ensure_ec_transfer_shutdown

        self.scheduler.shutdown()
        ensure_ec_transfer_shutdown()


def read_result(stream: Any, timeout_s: float) -> dict[str, Any]:
    """The next result a producer process printed on ``stream`` (other lines are skipped)."""
    import select

    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([stream], [], [], max(0.0, left))
        if not ready:
            raise TimeoutError(f"no producer result within {timeout_s} s")
        line = stream.readline()
        if not line:
            raise EOFError("the producer process ended without a result")
        if line.startswith(RESULT_PREFIX):
            result: dict[str, Any] = json.loads(line[len(RESULT_PREFIX):])
            return result


def _corrupt_own_entry(key: str, mutation: str) -> None:
    """Rewrite an entry this producer serves with one of the conformance kit's mutations (needs
    a backend with the ``entry_bytes``/``store_entry_bytes`` diagnostics, as NIXL's has)."""
    from vllm.distributed.ec_transfer import get_ec_transfer

    from ectransfer.testing import MUTATIONS

    backend = get_ec_transfer()._worker.backend  # type: ignore[attr-defined]
    skey = backend._skey(key)
    backend.store_entry_bytes(skey, MUTATIONS[mutation](backend.entry_bytes(skey)))


def _produce(spec: dict[str, Any]) -> None:
    """Producer process: for each JSON line on stdin (``{"requests": [{"id", "items"}]}``),
    encode the requests, wait for their saves, and print :data:`RESULT_PREFIX` followed by
    ``{"ec_transfer_params", "encoded"}`` as JSON (see :func:`read_result`).
    Ends at end of input; until then it also serves what it saved (a peer-to-peer producer)."""
    torch.set_num_threads(1)
    engine = Engine(vllm_config(spec["model"], "ec_producer", spec["extra"]))
    try:
        for line in sys.stdin:
            command = json.loads(line)
            if "corrupt" in command:  # fault injection into a peer-to-peer producer's own entries
                _corrupt_own_entry(command["corrupt"], command["mutation"])
                print(RESULT_PREFIX + json.dumps({"corrupted": command["corrupt"]}), flush=True)
                continue
            before = len(engine.encoded)
            for req in command["requests"]:
                engine.add(make_request(req["id"], req["items"], max_tokens=1))
            engine.run()
            encoded = engine.encoded[before:]
            engine.wait_saved(set(encoded))
            params = {r["id"]: engine.finished[r["id"]].ec_transfer_params for r in command["requests"]}
            print(RESULT_PREFIX + json.dumps({"ec_transfer_params": params, "encoded": encoded}), flush=True)
    finally:
        engine.close()


if __name__ == "__main__":
    if sys.argv[1] != "producer":
        raise SystemExit("usage: python -m ectransfer.testing.vllm producer SPEC.json")
    _produce(json.loads(Path(sys.argv[2]).read_text()))
    sys.stdout.flush()
    os._exit(0)  # skip native libraries' exit handlers (see the NIXL/libibverbs note)
