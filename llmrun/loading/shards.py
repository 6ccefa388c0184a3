"""One tensor-parallel rank's shard of a model: its slices of the safetensors, or of random weights.

A rank builds its modules on the meta device from ``ShardPlan.local_args`` (``llmrun.model.parallel``),
validates the checkpoint against the whole model's shapes, then views each tensor from a memory map
of its file and copies only its slice (``ShardPlan.piece``) to the device: the pages of the other
ranks' slices are never read into this process, so no rank holds the whole model. Random weights
draw each whole tensor from the same seeded generator as ``llmrun.loading.presets.random_model``
(one tensor at a time) and keep this rank's slice, so a sharded random model computes what the
unsharded one does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmrun.devices import DTYPE_NAMES, check_fits, oom_guard
from llmrun.loading.loader import _assign, _validated, read_model_args
from llmrun.loading.presets import WEIGHT_STD, _fill_normal
from llmrun.loading.safetensors import MappedFiles, checkpoint_files, read_index
from llmrun.model.config import ModelArgs
from llmrun.model.memory import weight_bytes
from llmrun.model.parallel import Collectives, ShardPlan, shard_modules
from llmrun.model.transformer import Transformer, fuse_projections


def load_shard(model_dir: Path, device: torch.device, dtype: torch.dtype, comm: Collectives) -> Transformer:
    """Rank ``comm.rank``'s shard of the checkpoint in ``model_dir``, on ``device`` in ``dtype``.

    A checkpoint that does not match config.json, or a tensor-parallel size that does not divide
    the model, is an ``LlmrunError``; so is running out of memory.
    """
    args = read_model_args(model_dir / "config.json")
    plan = ShardPlan(args, comm.rank, comm.size)
    with oom_guard(device, "loading this rank's weights"):
        entries = read_index(checkpoint_files(model_dir))
        with torch.device("meta"):
            whole = Transformer(args)
        entries = _validated(whole, entries)
        model = _meta_shard(plan, comm, device, dtype)
        fused = fuse_projections(model, device, dtype)
        mapped = MappedFiles()
        for name, tensor in mapped.iter_tensors(entries):
            piece = plan.piece(name, tensor)
            target = fused.get(name)
            if target is not None:
                target.copy_(piece)
            else:
                _assign(model, name, piece.to(device=device, dtype=dtype).contiguous())
            if target is not None or not piece.is_contiguous():
                mapped.release(entries[name])
        model.tie_weights()
    return model.eval()


def random_shard(
    args: ModelArgs, device: torch.device, dtype: torch.dtype, comm: Collectives, *, seed: int = 0
) -> Transformer:
    """Rank ``comm.rank``'s shard of ``random_model(args, device, dtype, seed=seed)``: the same values.

    Each whole tensor is drawn on ``device`` in turn and only this rank's slice kept, so the peak is
    the shard plus the largest single tensor.
    """
    plan = ShardPlan(args, comm.rank, comm.size)
    with torch.device("meta"):
        whole = dict(Transformer(args).named_parameters())
    model = _meta_shard(plan, comm, device, dtype)
    fused = fuse_projections(model, device, dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, _ in list(model.named_parameters()):
        full = torch.empty(whole[name].shape, device=device, dtype=dtype)
        if name.endswith("norm.weight"):
            full.fill_(1.0)
        else:
            _fill_normal(full, WEIGHT_STD, generator)
        piece = plan.piece(name, full)
        target = fused.get(name)
        if target is not None:
            target.copy_(piece)
        else:
            _assign(model, name, piece.clone(memory_format=torch.contiguous_format))
    model.tie_weights()
    return model.eval()


def _meta_shard(plan: ShardPlan, comm: Collectives, device: torch.device, dtype: torch.dtype) -> Transformer:
    """This rank's modules on the meta device, after checking that its weights fit on ``device``."""
    what = f"rank {plan.rank}'s share of the weights in {DTYPE_NAMES[dtype]}"
    check_fits(weight_bytes(plan.args, dtype) // plan.size, device, what)
    with torch.device("meta"):
        model = Transformer(plan.local_args)
        shard_modules(model, plan, comm)
    return model
