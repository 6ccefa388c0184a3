"""The model: ``ModelArgs``, the Llama-family transformer, the KV cache, the executor and the decode fast paths.

Nothing here reads files, times itself or knows the command line; ``llmrun.loading`` builds models
and ``llmrun.profiler`` times them through the executor's probe points.
"""
