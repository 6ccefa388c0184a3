"""Property-based fuzzing of what reads untrusted input: safetensors headers, config.json, sampling flags.

The property is always the same: the input is either accepted, and then everything downstream holds
(offsets inside the file, sizes that add up, positive shapes, a sampling distribution that sums to
one), or refused with an ``LlmrunError``. Any other exception is a bug.

CI runs ``LLMRUN_FUZZ_EXAMPLES`` examples per test (default 60); ``scripts/fuzz.sh`` runs far more.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from llmrun.cli.prompts import sampling_flags
from llmrun.errors import LlmrunError
from llmrun.generation.sampling import Sampler, SamplingParams
from llmrun.loading.loader import read_model_args
from llmrun.loading.safetensors import SAFETENSORS_DTYPES, MappedFiles, read_header
from llmrun.model.config import ModelArgs

EXAMPLES = int(os.environ.get("LLMRUN_FUZZ_EXAMPLES", "60"))
fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@pytest.fixture(scope="module")
def scratch() -> Path:
    """One file path reused by every example (hypothesis runs examples in one test call)."""
    with tempfile.TemporaryDirectory(prefix="llmrun-fuzz-") as tmp:
        yield Path(tmp) / "model.safetensors"


# ---------------------------------------------------------------- safetensors

# JSON values of every kind, for fields that should hold something specific.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)
dtype_names = st.sampled_from([*SAFETENSORS_DTYPES, "F8_E4M3", "C64", "U16", "", "f32"]) | st.text(max_size=5)
shapes = st.lists(st.integers(-2, 9), max_size=4) | json_values
offsets = st.lists(st.integers(-16, 2**20), min_size=2, max_size=2) | st.lists(st.integers(0, 600), max_size=3)
tensor_specs = st.fixed_dictionaries({"dtype": dtype_names, "shape": shapes, "data_offsets": offsets}) | json_values
headers = st.dictionaries(st.text(min_size=1, max_size=12), tensor_specs, max_size=6)


def _check_accepted(path: Path, entries: dict) -> None:
    """What read_header promises about the tensors of a file it accepted."""
    size = path.stat().st_size
    spans = []
    for name, entry in entries.items():
        assert 8 <= entry.begin <= entry.end <= size, name
        assert entry.end - entry.begin == math.prod(entry.shape) * entry.dtype.itemsize, name
        assert all(d >= 0 for d in entry.shape)
        spans.append((entry.begin, entry.end))
        tensor = MappedFiles().tensor(entry)
        assert tuple(tensor.shape) == entry.shape and tensor.dtype == entry.dtype
    spans = sorted(s for s in spans if s[1] > s[0])
    assert all(a_end <= b_begin for (_, a_end), (b_begin, _) in zip(spans, spans[1:], strict=False))


def _read(path: Path) -> None:
    try:
        entries = read_header(path)
    except LlmrunError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    _check_accepted(path, entries)


@fuzz
@given(raw=st.binary(max_size=256))
def test_arbitrary_bytes(scratch, raw):
    scratch.write_bytes(raw)
    _read(scratch)


@fuzz
@given(
    header=headers,
    metadata=st.none() | json_values,
    data=st.binary(max_size=600),
    length_delta=st.sampled_from([0, 0, 0, 1, -1, 7, 2**40]),
)
def test_structured_headers(scratch, header, metadata, data, length_delta):
    if metadata is not None:
        header = {"__metadata__": metadata, **header}
    raw = json.dumps(header).encode()
    scratch.write_bytes(struct.pack("<Q", max(0, len(raw) + length_delta)) + raw + data)
    _read(scratch)


float_dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int64, torch.bool])
tensor_dicts = st.dictionaries(
    st.text("abcdefghij._", min_size=1, max_size=10),
    st.tuples(st.lists(st.integers(0, 5), max_size=3), float_dtypes),
    min_size=1,
    max_size=5,
)


def _tensor(shape: list[int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 50).to(dtype)


@fuzz
@given(spec=tensor_dicts, seed=st.integers(0, 2**16))
def test_files_written_by_safetensors_read_back_exactly(scratch, spec, seed):
    tensors = {name: _tensor(shape, dtype, seed + i) for i, (name, (shape, dtype)) in enumerate(spec.items())}
    save_file(tensors, scratch)
    entries = read_header(scratch)
    assert entries.keys() == tensors.keys()
    _check_accepted(scratch, entries)
    mapped = MappedFiles()
    for name, tensor in tensors.items():
        assert torch.equal(mapped.tensor(entries[name]), tensor), name


@fuzz
@given(
    spec=tensor_dicts,
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
    cut=st.none() | st.integers(0, 10**6),
)
def test_damaged_safetensors_files(scratch, spec, flips, cut):
    save_file({name: _tensor(shape, dtype, 0) for name, (shape, dtype) in spec.items()}, scratch)
    raw = bytearray(scratch.read_bytes())
    for position, value in flips:
        raw[position % len(raw)] = value
    if cut is not None:
        raw = raw[: cut % (len(raw) + 1)]
    scratch.write_bytes(bytes(raw))
    _read(scratch)


# ---------------------------------------------------------------- config.json

VALID_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}
config_keys = st.sampled_from(
    [
        *VALID_CONFIG,
        "head_dim",
        "rope_scaling",
        "rope_parameters",
        "hidden_act",
        "sliding_window",
        "use_sliding_window",
        "max_window_layers",
        "layer_types",
        "attention_bias",
        "eos_token_id",
    ]
)
rope_scalings = st.fixed_dictionaries(
    {"rope_type": st.sampled_from(["default", "linear", "dynamic", "llama3", "yarn", "x"])},
    optional={
        "type": st.sampled_from(["linear", "dynamic"]),
        "factor": json_values | st.floats(0, 64),
        "low_freq_factor": json_values,
        "high_freq_factor": json_values,
        "original_max_position_embeddings": json_values | st.integers(1, 8192),
        "rope_theta": json_values,
    },
)
config_values = (
    json_values
    | st.integers(-3, 300)
    | rope_scalings
    | st.sampled_from(["llama", "mistral", "qwen2", "gpt2", "silu", "gelu"])
    | st.lists(st.sampled_from(["full", "sliding_attention", "x"]), max_size=4)
)


def _check_config(args: ModelArgs) -> None:
    """What every accepted config promises to the model code."""
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        value = getattr(args, name)
        assert isinstance(value, int) and not isinstance(value, bool) and value > 0, name
    assert isinstance(args.head_dim, int) and args.head_dim > 0
    assert isinstance(args.num_key_value_heads, int) and args.num_key_value_heads > 0
    assert args.num_attention_heads % args.num_key_value_heads == 0
    assert args.kv_groups >= 1
    assert math.isfinite(args.rope_theta) and args.rope_theta > 0
    assert math.isfinite(args.rms_norm_eps) and args.rms_norm_eps >= 0
    assert args.sliding_window is None or args.sliding_window > 0
    try:
        assert args.context_length >= args.max_position_embeddings > 0
        windows = args.attention_windows()
        assert len(windows) == args.num_hidden_layers
        assert isinstance(args.rope_type, str)
    except LlmrunError:
        pass


@fuzz
@given(changes=st.dictionaries(config_keys, config_values | st.just(None), max_size=5), drop=st.sets(config_keys))
@example(changes={"architectures": 1, "model_type": None}, drop=set())  # found by this test: a TypeError
@example(changes={"num_attention_heads": 0}, drop={"head_dim"})  # found by the corpus: a ZeroDivisionError
@example(changes={"rope_scaling": {"rope_type": "dynamic", "factor": 0.00390625}}, drop=set())  # context 0
def test_config_dicts(changes, drop):
    raw = {k: v for k, v in {**VALID_CONFIG, **changes}.items() if k not in drop or k in changes}
    try:
        args = ModelArgs.from_dict(raw)
    except LlmrunError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    _check_config(args)


@fuzz
@given(raw=st.binary(max_size=200) | st.builds(lambda v: json.dumps(v).encode(), json_values))
def test_config_files(tmp_path_factory, raw):
    path = tmp_path_factory.getbasetemp() / "fuzz-config.json"
    path.write_bytes(raw)
    try:
        args = read_model_args(path)
    except LlmrunError:
        return
    _check_config(args)


# ---------------------------------------------------------------- sampling flags

any_floats = st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True)
sampling_floats = any_floats | st.sampled_from([0.0, 1.0, 1e-300, 5e-324, 1e-45, 1e300, -0.0]) | st.floats(0, 2)


@fuzz
@given(
    temperature=sampling_floats,
    top_k=st.integers(-5, 2**40),
    top_p=sampling_floats,
    min_p=sampling_floats,
    repetition_penalty=sampling_floats,
    seed=st.none() | st.integers(0, 2**63 - 1),
    vocab=st.integers(1, 50),
    scale=st.sampled_from([1.0, 30.0, 1e4]),
    logits_seed=st.integers(0, 2**16),
    history_len=st.integers(0, 6),
)
# Found by this test, each gave NaN probabilities: a top_p that rounds to 0 in float32, and a temperature or
# repetition penalty so small that the scaled logits overflow.
@example(1.0, 0, 2.3e-278, 0.0, 1.0, None, 1, 1.0, 0, 0)
@example(1.2e-50, 0, 1.0, 0.0, 1.0, None, 1, 1.0, 0, 0)
@example(1.0, 0, 1.0, 0.0, 1e-300, 0, 5, 30.0, 0, 6)
def test_sampling_flags(
    temperature, top_k, top_p, min_p, repetition_penalty, seed, vocab, scale, logits_seed, history_len
):
    try:
        params = SamplingParams(**sampling_flags(temperature, top_k, top_p, min_p, repetition_penalty, seed))
    except LlmrunError as exc:
        assert str(exc).startswith("--")  # names the flag
        return
    sampler = Sampler(params)
    gen = torch.Generator().manual_seed(logits_seed)
    logits = torch.randn(2, vocab, generator=gen) * scale
    history = torch.randint(0, vocab, (2, history_len), generator=gen)
    probs = sampler.probs(logits, history)
    assert torch.isfinite(probs).all()
    assert torch.allclose(probs.sum(-1), torch.ones(2), atol=1e-4)
    ids = sampler(logits, history)
    assert ids.shape == (2,) and ((ids >= 0) & (ids < vocab)).all()
    assert (probs.gather(1, ids[:, None]) > 0).all()


@fuzz
@given(params=st.builds(SamplingParams, any_floats, st.integers(-5, 10), any_floats, any_floats, any_floats))
def test_sampling_params_validate_refuses_or_accepts(params):
    try:
        params.validate()
    except LlmrunError:
        return
    assert math.isfinite(params.temperature) and params.temperature >= 0
    assert 0 < params.top_p <= 1 and 0 <= params.min_p <= 1 and params.top_k >= 0
    assert math.isfinite(params.repetition_penalty) and params.repetition_penalty > 0
