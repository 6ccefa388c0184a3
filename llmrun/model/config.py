"""Model hyper-parameters, read from a Hugging Face ``config.json``.

``ModelArgs`` keeps the Hugging Face field names so that a checkpoint's config maps onto it
directly; unknown keys are ignored (as in mlx-lm's ``ModelArgs.from_dict``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from llmrun.errors import LlmrunError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# The causal-LM classes of those model types; a config naming another head (e.g. a classifier) is refused.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_SUPPORTED = ", ".join(f"{a} ({t})" for a, t in zip(SUPPORTED_ARCHITECTURES, SUPPORTED_MODEL_TYPES, strict=True))
# rope_scaling types and the keys each needs (transformers' ``modeling_rope_utils``).
ROPE_TYPES: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}

_REQUIRED_INT_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


@dataclass
class ModelArgs:
    """Shapes and constants of a Llama-family decoder.

    Sizes are element counts; ``rope_theta`` is the RoPE base; ``max_position_embeddings`` is the
    context window in tokens.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    model_type: str = "llama"
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads > 0:  # <= 0 is refused just below
            if self.hidden_size % self.num_attention_heads:
                raise LlmrunError(
                    f"config.json: hidden_size {self.hidden_size} is not divisible by "
                    f"num_attention_heads {self.num_attention_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in (*_REQUIRED_INT_KEYS, "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise LlmrunError(f"config.json: {name} must be a positive integer, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise LlmrunError(
                f"config.json: num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.hidden_act not in ("silu", "swish"):
            raise LlmrunError(f"config.json: hidden_act {self.hidden_act!r} is not supported (only silu)")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)

    @property
    def rope_type(self) -> str:
        """``default``, ``linear``, ``dynamic`` or ``llama3``."""
        scaling = self.rope_scaling or {}
        return scaling.get("rope_type", scaling.get("type", "default"))

    @property
    def context_length(self) -> int:
        """The longest sequence (tokens) llmrun runs: ``max_position_embeddings``, times the factor of
        dynamic-NTK RoPE, which exists to stretch the context past what the model was trained on."""
        if self.rope_type == "dynamic":
            return int(self.max_position_embeddings * float(self.rope_scaling["factor"]))
        return self.max_position_embeddings

    def attention_windows(self) -> list[int | None]:
        """Per layer, the sliding attention window in tokens (query i sees keys i-w+1..i), or None for full.

        Mistral applies ``sliding_window`` to every layer; Qwen2 only when ``use_sliding_window`` is set,
        to the layers ``layer_types`` marks ``sliding_attention`` (by default those from
        ``max_window_layers`` on), as transformers' ``Qwen2Config`` does. Llama has no window.
        """
        n = self.num_hidden_layers
        if self.sliding_window is None or self.model_type == "llama":
            return [None] * n
        if self.model_type == "mistral":
            return [self.sliding_window] * n
        if not self.extra.get("use_sliding_window", False):
            return [None] * n
        first = self.extra.get("max_window_layers", 28)
        kinds = self.extra.get("layer_types") or ["sliding_attention" if i >= first else "full" for i in range(n)]
        if len(kinds) != n:
            raise LlmrunError(f"config.json: layer_types has {len(kinds)} entries for {n} layers")
        return [self.sliding_window if kind == "sliding_attention" else None for kind in kinds]

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head (1 for multi-head attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "config.json") -> ModelArgs:
        """Build from a config dict, checking the architecture and the types of required keys."""
        if not isinstance(raw, dict):
            raise LlmrunError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        archs = raw.get("architectures") or []
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise LlmrunError(f"{source}: 'architectures' must be a list of class names, got {archs!r}")
        model_type = raw.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            arch = ", ".join(archs) or model_type
            raise LlmrunError(
                f"{source}: architecture {arch!r} (model_type {model_type!r}) is not supported; supported: {_SUPPORTED}"
            )
        for key in _REQUIRED_INT_KEYS:
            if key not in raw:
                raise LlmrunError(f"{source}: required key {key!r} is missing")
            if not isinstance(raw[key], int) or isinstance(raw[key], bool):
                raise LlmrunError(f"{source}: {key!r} must be an integer, got {raw[key]!r}")
        if archs and not set(archs) & set(SUPPORTED_ARCHITECTURES):
            raise LlmrunError(
                f"{source}: architecture {', '.join(map(str, archs))!r} is not supported; supported: {_SUPPORTED}"
            )
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in raw.items() if k in known and v is not None}
        kwargs.update(_from_rope_parameters(raw.get("rope_parameters"), kwargs))
        if model_type == "qwen2":
            kwargs.setdefault("attention_bias", True)
        _check_types(kwargs, source)
        return cls(**kwargs, extra={k: v for k, v in raw.items() if k not in known})


def _from_rope_parameters(rope: object, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``rope_theta``/``rope_scaling`` from transformers 5's ``rope_parameters`` (which replaces both).

    Keys already given at the top level of config.json win.
    """
    if not isinstance(rope, dict):
        return {}
    out: dict[str, Any] = {}
    if "rope_theta" in rope and "rope_theta" not in kwargs:
        out["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", rope.get("type", "default")) != "default" and "rope_scaling" not in kwargs:
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return out


def _check_rope_scaling(scaling: dict[str, Any]) -> None:
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise LlmrunError(
            f"config.json: rope_scaling type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
        )
    for key in ROPE_TYPES[kind]:
        value = scaling.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise LlmrunError(f"config.json: rope_scaling {kind!r} needs a positive number {key!r}, got {value!r}")
    # As transformers' rope validation: scaling stretches the context, and llama3's band must not be empty.
    if "factor" in ROPE_TYPES[kind] and scaling["factor"] < 1:
        raise LlmrunError(f"config.json: rope_scaling {kind!r} needs factor >= 1, got {scaling['factor']!r}")
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise LlmrunError("config.json: rope_scaling 'llama3' needs high_freq_factor > low_freq_factor")


def _check_types(kwargs: dict[str, Any], source: str) -> None:
    """Reject values whose JSON type cannot be what the field means."""
    numeric = {"rms_norm_eps": (int, float), "rope_theta": (int, float)}
    integers = ("num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")
    for key, types in numeric.items():
        if key in kwargs and (not isinstance(kwargs[key], types) or isinstance(kwargs[key], bool)):
            raise LlmrunError(f"{source}: {key!r} must be a number, got {kwargs[key]!r}")
    for key in integers:
        if key in kwargs and (not isinstance(kwargs[key], int) or isinstance(kwargs[key], bool)):
            raise LlmrunError(f"{source}: {key!r} must be an integer, got {kwargs[key]!r}")
    eps, theta, window = kwargs.get("rms_norm_eps", 0), kwargs.get("rope_theta", 1), kwargs.get("sliding_window", 1)
    if not math.isfinite(eps) or eps < 0:
        raise LlmrunError(f"{source}: 'rms_norm_eps' must be a finite number >= 0, got {eps!r}")
    if not math.isfinite(theta) or theta <= 0:
        raise LlmrunError(f"{source}: 'rope_theta' must be a finite number > 0, got {theta!r}")
    if window <= 0:
        raise LlmrunError(f"{source}: 'sliding_window' must be a positive integer, got {window!r}")
    if "rope_scaling" in kwargs and not isinstance(kwargs["rope_scaling"], dict):
        raise LlmrunError(f"{source}: 'rope_scaling' must be an object, got {kwargs['rope_scaling']!r}")
