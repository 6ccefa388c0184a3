"""Pick the next token from logits: greedy, temperature, top-k, top-p, min-p, repetition penalty.

The knobs mean what they mean in Hugging Face ``generate`` and llama.cpp:

* repetition penalty as in CTRL (Keskar et al. 2019) and transformers'
  ``RepetitionPenaltyLogitsProcessor``: for every id already in the sequence,
  a positive logit is divided by ``r`` and a negative one multiplied by ``r``;
* temperature divides the logits; 0 means greedy (argmax, the filters are skipped);
* top-k keeps the ``k`` largest logits (0 = off);
* top-p (nucleus, Holtzman et al. 2019) keeps the smallest set of most likely
  tokens whose probability sums to at least ``p``; the top token always stays;
* min-p (as in llama.cpp) drops tokens less likely than ``min_p`` times the top token.

They run in that order, each on the distribution the previous one left, all in
float32. The only host-device synchronisation is the one inside
``torch.multinomial``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmrun.errors import LlmrunError

SEED_MAX = 2**64 - 1
SEED_MIN = -(2**63)
"""torch's generators take seeds up to 2^64 - 1, and negative ones down to -2^63 (counted modulo 2^64)."""
RANDOM_SEED = -1
"""The seed that asks for a random one, drawn and reported (llama.cpp's ``--seed -1``)."""


def check_seed(seed: int | None) -> None:
    """``LlmrunError`` naming ``--seed`` unless ``seed`` is None or within what torch's generators take."""
    if seed is not None and not SEED_MIN <= seed <= SEED_MAX:
        raise LlmrunError(f"--seed {seed} is out of range: seeds go from 0 to {SEED_MAX} (2^64 - 1)")


@dataclass(frozen=True)
class SamplingParams:
    """User-facing sampling settings (the ``generate`` flags of the same names)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self) -> None:
        """Raise ``LlmrunError`` naming the flag if any setting is out of range."""
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise LlmrunError(f"--temperature must be a finite number >= 0 (0 means greedy), got {self.temperature}.")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise LlmrunError(f"--top-k must be an integer >= 0 (0 turns it off), got {self.top_k}.")
        if not (0 < self.top_p <= 1):
            raise LlmrunError(f"--top-p must be in (0, 1] (1 turns it off), got {self.top_p}.")
        if not (0 <= self.min_p <= 1):
            raise LlmrunError(f"--min-p must be in [0, 1] (0 turns it off), got {self.min_p}.")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise LlmrunError(
                f"--repetition-penalty must be a finite number > 0 (1 turns it off), got {self.repetition_penalty}."
            )
        check_seed(self.seed)


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise every id in ``history``, as transformers' ``RepetitionPenaltyLogitsProcessor``.

    Args:
        logits: (B, V) float.
        history: (B, n) int64 ids already in each sequence; repeats count once.
        penalty: r > 0; r > 1 discourages repeats.

    Returns:
        (B, V) new tensor: logit / r where positive, logit * r where negative, at the history ids.
    """
    picked = logits.gather(1, history).double()  # (B, n); float64 and clamped, so no penalty makes inf or NaN
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    big = torch.finfo(logits.dtype).max
    return logits.scatter(1, history, picked.clamp(-big, big).to(logits.dtype))


class Sampler:
    """Draw next ids from logits with the settings in ``params`` and its own seeded generator.

    ``seed`` holds the seed in use (``params.seed``, or a fresh random one when that is None),
    so a run can be reproduced. The generator lives on ``device``; logits must be there too.
    """

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu") -> None:
        params.validate()
        self.params = params
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        if params.seed is None:
            self.seed: int = self.generator.seed()
        else:
            self.seed = params.seed
            self.generator.manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        """Sample one next id per row.

        Args:
            logits: (B, V) any float dtype, on the sampler's device.
            history: (B, n) int64 ids of each sequence so far (prompt + generated), for the
                repetition penalty; None or n = 0 means no history.

        Returns:
            (B,) int64 ids on ``logits.device``.
        """
        x = self._penalized(logits, history)
        if self.params.temperature == 0:
            return x.argmax(dim=-1)
        vals, idx = self._filtered(x)
        probs = torch.softmax(vals, dim=-1)
        choice = torch.multinomial(probs, 1, generator=self.generator)  # (B, 1) index into vals
        ids = choice if idx is None else idx.gather(1, choice)
        return ids.squeeze(1)

    def probs(self, logits: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        """The distribution ``__call__`` draws from: (B, V) float32, rows sum to 1.

        With temperature 0 each row is one-hot at the argmax.
        """
        x = self._penalized(logits, history)
        if self.params.temperature == 0:
            return torch.zeros_like(x).scatter_(1, x.argmax(dim=-1, keepdim=True), 1.0)
        vals, idx = self._filtered(x)
        probs = torch.softmax(vals, dim=-1)
        if idx is None:
            return probs
        return torch.zeros_like(x).scatter_(1, idx, probs)

    def _penalized(self, logits: torch.Tensor, history: torch.Tensor | None) -> torch.Tensor:
        if logits.dim() != 2:
            raise ValueError(f"logits must be (B, V), got shape {tuple(logits.shape)}")
        x = logits.float()  # (B, V) float32; may alias the input, so no in-place ops below
        r = self.params.repetition_penalty
        if r != 1.0 and history is not None and history.shape[-1] > 0:
            if history.dim() != 2 or history.shape[0] != x.shape[0]:
                raise ValueError(f"history must be (B, n) with B = {x.shape[0]}, got shape {tuple(history.shape)}")
            x = apply_repetition_penalty(x, history.to(x.device, torch.int64), r)
        return x

    def _filtered(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Temperature, top-k, top-p, min-p on (B, V) float32 logits.

        Returns logits of the surviving candidates (-inf for dropped ones) and their
        vocabulary ids: (B, K) and (B, K), K = top_k when top-k is on (sorted descending),
        or (B, V) logits and None when no filter needs an ordering.
        """
        p = self.params
        # Shifted so the top logit is 0 (softmax and every filter are shift-invariant) and divided in float64:
        # a temperature too small for float32 (< 1e-45 rounds to 0) then means greedy instead of NaN.
        x = ((x - x.amax(dim=-1, keepdim=True)).double() / p.temperature).float()
        vocab = x.shape[-1]
        if 0 < p.top_k < vocab:
            vals, idx = torch.topk(x, p.top_k, dim=-1)  # sorted descending
        elif p.top_p < 1.0:
            vals, idx = torch.sort(x, dim=-1, descending=True)
        else:
            vals, idx = x, None
        if p.top_p < 1.0:
            probs = torch.softmax(vals, dim=-1)
            mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the tokens ranked above
            drop = mass_before >= p.top_p
            drop[:, 0] = False  # the top token stays even when top_p rounds to 0 in float32
            vals = vals.masked_fill(drop, -math.inf)
        if p.min_p > 0.0:
            probs = torch.softmax(vals, dim=-1)
            floor = p.min_p * probs.amax(dim=-1, keepdim=True)
            vals = vals.masked_fill(probs < floor, -math.inf)
        return vals, idx
