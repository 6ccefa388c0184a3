"""Throughput benchmark in the spirit of llama.cpp's ``llama-bench``, with a speed of light per row.

Tests, as in llama-bench:

* ``pp N``: one prefill of N random tokens per sequence from an empty cache; tok/s = B·N / time.
  Only the last position goes through the lm_head, as in generation.
* ``tg N``: N decode steps from an empty cache, one token per sequence each (ids fixed in advance,
  no sampling); tok/s = B·N / time.
* ``pp N + tg M``: both in a row, timed together; tok/s = B·(N + M) / time.

``plan`` builds the tests, ``run`` times them and builds the rows, ``render`` prints the report
(md, csv, json, jsonl). Speed of light per row: the cost model's FLOPs and bytes of each phase
(``llmrun.profiler.costs``) at the device roofs (``llmrun.profiler.roofs.Roofs.light_s``); see
docs/roofline.md. ``llmrun.profiler.kernel_floor`` adds the GEMV floor of tg rows.
"""
