"""The roofline profiler: per-op timers, analytical costs, hardware roofs, reports.

``timers`` (CUDA events / perf_counter behind the executor's ``Probe``), ``measure`` (warm-up and
repeats of prefill and decode), ``costs`` (FLOPs and bytes per op), ``hardware`` and ``peaks``
(spec table, NVML, measured roofs), ``roofline`` (rows), ``report`` (table, JSON, CSV, markdown),
``plot`` (the chart), ``compare`` (two reports), ``schema`` (the JSON report's schema).
Nothing here changes what the executor computes.
"""
