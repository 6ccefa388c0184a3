"""The roofline profiler: per-op timers, the cost model, hardware roofs, reports, benchmarks.

``timers`` (CUDA events / perf_counter behind the executor's ``Probe``, and ``time_calls``),
``measure`` (warm-up and repeats of prefill and decode), ``costs`` (the one cost model: FLOPs and
bytes per op), ``roofs`` and ``peaks`` (the ``Roofs`` type; spec table, NVML, measured roofs),
``roofline`` (rows), ``profile`` (a whole profile of a loaded model), ``report`` (table, JSON, CSV,
markdown), ``plot`` (the chart), ``compare`` (two reports), ``schema`` (the JSON report's schema),
``modelinfo`` (``llmrun info``'s figures), ``bench`` (``llmrun bench``), ``kernel_floor`` (the GEMV
floor of decode), ``environment`` (versions and commit beside a result). docs/roofline.md
explains the cost model and the roofs. Nothing here changes what the executor computes.
"""
