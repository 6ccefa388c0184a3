"""Tensor parallelism's processes: the group a rank joins, llmrun's own launcher, and failures.

``group`` joins the ``torch.distributed`` group a process was started in (by ``launch`` or by
``torchrun``: RANK, WORLD_SIZE, LOCAL_RANK set), gloo on the CPU and NCCL on CUDA; ``launch``
starts N workers on this machine through torch's elastic launcher (what torchrun runs) and turns
the first failure into one line; ``faults`` is what a failing worker records for it. What a
sharded model computes is ``llmrun.model.parallel``; the slices it loads, ``llmrun.loading.shards``.
"""
