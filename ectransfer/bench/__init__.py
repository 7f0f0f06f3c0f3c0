"""``ectransfer-bench``: throughput of every transport side by side (see ``docs/benchmarks.md``).

Modules: :mod:`~ectransfer.bench.cli` (arguments, validation, the run),
:mod:`~ectransfer.bench.targets` (which backends, where, why skipped),
:mod:`~ectransfer.bench.workload` (the items), :mod:`~ectransfer.bench.kinds` (ectransfer and
raw subjects), :mod:`~ectransfer.bench.vllm_example` (vLLM's ``ECExampleConnector``),
:mod:`~ectransfer.bench.runner` (timing loops), :mod:`~ectransfer.bench.ceilings` (CUDA
ceilings), :mod:`~ectransfer.bench.report` (rows, table, ratios, JSON),
:mod:`~ectransfer.bench.plot` (PNG), :mod:`~ectransfer.bench.progress` (progress bar) and
:mod:`~ectransfer.bench.raw` (the raw-client baselines).
"""
