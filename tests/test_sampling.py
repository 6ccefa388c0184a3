"""Sampler semantics: greedy, filters, seeding, the sampled distribution, repetition penalty."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmrun.errors import LlmrunError
from llmrun.generation.sampling import Sampler, SamplingParams, apply_repetition_penalty

PLAIN = dict(top_k=0, top_p=1.0, min_p=0.0)  # no filter: pure softmax sampling


def _logits(seed: int, batch: int = 4, vocab: int = 50, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g) * scale


def test_greedy_is_argmax_and_ignores_filters() -> None:
    logits = _logits(0, batch=8)
    sampler = Sampler(SamplingParams(temperature=0.0, top_k=3, top_p=0.1, min_p=0.9, seed=1))
    ids = sampler(logits)
    assert ids.dtype == torch.int64 and ids.shape == (8,)
    torch.testing.assert_close(ids, logits.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_accepts_low_precision_logits(dtype: torch.dtype) -> None:
    logits = _logits(1).to(dtype)
    ids = Sampler(SamplingParams(temperature=0.0))(logits)
    torch.testing.assert_close(ids, logits.float().argmax(-1))


@pytest.mark.parametrize("temperature", [0.1, 1.0, 5.0, 100.0])
def test_top_k_1_is_argmax_at_any_temperature(temperature: float) -> None:
    logits = _logits(2, batch=64)
    sampler = Sampler(SamplingParams(temperature=temperature, top_k=1, top_p=1.0, min_p=0.0, seed=3))
    for _ in range(5):
        torch.testing.assert_close(sampler(logits), logits.argmax(-1))


def test_same_seed_same_ids_different_seeds_differ() -> None:
    logits = _logits(4, batch=256, scale=0.5)  # flat: many plausible tokens per row
    params = SamplingParams(temperature=1.0, **PLAIN)

    def draws(seed: int) -> torch.Tensor:
        sampler = Sampler(SamplingParams(**{**params.__dict__, "seed": seed}))
        return torch.stack([sampler(logits) for _ in range(4)])

    torch.testing.assert_close(draws(7), draws(7))
    # 1024 draws over ~50 near-uniform tokens: two seeds agreeing everywhere is impossible in practice.
    assert (draws(7) != draws(8)).float().mean() > 0.5


def test_unseeded_sampler_records_its_seed() -> None:
    logits = _logits(5, batch=128, scale=0.5)
    first = Sampler(SamplingParams(temperature=1.0, **PLAIN))
    again = Sampler(SamplingParams(temperature=1.0, seed=first.seed, **PLAIN))
    torch.testing.assert_close(first(logits), again(logits))


def test_empirical_distribution_matches_softmax() -> None:
    """20000 draws at temperature 1 with no filters follow softmax(logits).

    Pearson chi-square with V - 1 = 7 degrees of freedom; 24.32 is its 0.999 quantile
    (standard chi-square table), so a correct sampler fails this for 1 seed in 1000, and
    the fixed seed makes it deterministic. Every expected count is > 250, far above the
    ~5 the chi-square approximation needs. The same counts must reject a distribution
    only 10 % off in temperature, which shows the test has the power to catch a real bug.
    """
    n = 20000
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 0.3])

    def chi2(counts: torch.Tensor, temperature: float) -> float:
        expected = torch.softmax(logits.double() / temperature, -1) * n
        assert expected.min() > 250
        return ((counts - expected) ** 2 / expected).sum().item()

    sampler = Sampler(SamplingParams(temperature=1.0, seed=1234, **PLAIN))
    counts = torch.bincount(sampler(logits.expand(n, -1)), minlength=8).double()
    assert chi2(counts, 1.0) < 24.32, counts.tolist()
    assert chi2(counts, 1.1) > 24.32 and chi2(counts, 0.9) > 24.32


def test_temperature_and_top_k_distribution_matches_reference() -> None:
    logits = _logits(6, batch=3, vocab=30)
    sampler = Sampler(SamplingParams(temperature=0.7, top_k=5, top_p=1.0, min_p=0.0, seed=0))
    ref = torch.full_like(logits, -math.inf)
    top = logits.topk(5, -1)
    ref.scatter_(1, top.indices, top.values / 0.7)
    torch.testing.assert_close(sampler.probs(logits), torch.softmax(ref, -1))


@pytest.mark.parametrize(("top_p", "kept"), [(0.25, 1), (0.5, 2), (0.51, 3), (0.75, 3), (1.0, 4)])
def test_top_p_boundary_on_a_uniform_distribution(top_p: float, kept: int) -> None:
    """Probabilities of 1/4 are exact in float32: the nucleus stops as soon as it reaches p (as HF)."""
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=top_p, min_p=0.0))
    probs = sampler.probs(torch.zeros(1, 4))
    assert int((probs > 0).sum()) == kept


finite_logits = st.lists(st.floats(min_value=-20, max_value=20, allow_nan=False, width=32), min_size=2, max_size=40)
TOL = 1e-4  # float32 softmax/cumsum error is ~1e-6; stay clear of ties at the cut


@settings(max_examples=50, deadline=None)
@given(values=finite_logits, top_p=st.floats(min_value=0.01, max_value=1.0), seed=st.integers(0, 2**31))
def test_top_p_keeps_smallest_nucleus_and_never_samples_outside(values, top_p, seed) -> None:
    logits = torch.tensor([values])
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=top_p, min_p=0.0, seed=seed))
    probs = sampler.probs(logits)[0]
    ref = torch.softmax(logits[0].double(), -1)
    # Tied tokens may be ranked either way, so bound each token's rank by its ties.
    above = (ref[None, :] > ref[:, None] * (1 + TOL)).double() @ ref  # mass ranked surely above i
    at_or_above = (ref[None, :] >= ref[:, None] * (1 - TOL)).double() @ ref - ref  # possibly above i
    kept = probs > 0
    assert kept[ref >= ref.max() * (1 - TOL)].any(), "the top token is always kept"
    assert not (kept & (above > top_p + TOL)).any(), "a token outside the nucleus survived"
    assert kept[at_or_above < top_p - TOL].all(), "the nucleus was cut short"
    assert ref[kept].sum() >= top_p - TOL
    ids = sampler(logits.expand(200, -1))
    assert kept[ids].all()


@settings(max_examples=50, deadline=None)
@given(values=finite_logits, min_p=st.floats(min_value=0.0, max_value=1.0), seed=st.integers(0, 2**31))
def test_min_p_drops_unlikely_tokens_and_never_samples_them(values, min_p, seed) -> None:
    logits = torch.tensor([values])
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=min_p, seed=seed))
    probs = sampler.probs(logits)[0]
    ref = torch.softmax(logits[0].double(), -1)
    floor = min_p * ref.max()
    kept = probs > 0
    assert kept[ref.argmax()]
    assert not (kept & (ref < floor * (1 - TOL))).any(), "a token below min_p survived"
    assert kept[ref > floor * (1 + TOL)].all(), "a token above min_p was dropped"
    ids = sampler(logits.expand(200, -1))
    assert kept[ids].all()


@settings(max_examples=50, deadline=None)
@given(
    values=finite_logits,
    temperature=st.floats(min_value=0.05, max_value=5.0),
    top_k=st.integers(0, 50),
    top_p=st.floats(min_value=0.01, max_value=1.0),
    min_p=st.floats(min_value=0.0, max_value=1.0),
)
def test_combined_filters_give_a_distribution_and_sample_inside_it(values, temperature, top_k, top_p, min_p):
    logits = torch.tensor([values, values[::-1]])
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=0)
    sampler = Sampler(params)
    probs = sampler.probs(logits)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    kept = probs > 0
    assert (kept & (logits == logits.amax(-1, keepdim=True))).any(-1).all(), "a top token is always kept"
    if top_k:
        assert (kept.sum(-1) <= top_k).all()
    ids = sampler(logits.repeat(100, 1))
    assert kept.repeat(100, 1).gather(1, ids[:, None]).all()


def test_repetition_penalty_matches_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    logits = _logits(9, batch=3, vocab=100)
    history = torch.randint(0, 100, (3, 20), generator=torch.Generator().manual_seed(10))
    for penalty in (0.7, 1.3, 2.0):
        ref = transformers.RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
        torch.testing.assert_close(apply_repetition_penalty(logits, history, penalty), ref)


def test_repetition_penalty_lowers_probability_of_repeated_ids() -> None:
    logits = _logits(11, batch=2, vocab=40)
    history = torch.tensor([[3, 3, 7, 21], [0, 5, 9, 39]])
    plain = Sampler(SamplingParams(temperature=1.0, **PLAIN)).probs(logits, history)
    penalized = Sampler(SamplingParams(temperature=1.0, repetition_penalty=1.5, **PLAIN)).probs(logits, history)
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, history, True)
    assert (penalized[seen] < plain[seen]).all()
    assert (penalized[~seen] > plain[~seen]).all()  # the mass moves to unseen ids


def test_repetition_penalty_applies_before_greedy() -> None:
    logits = torch.tensor([[5.0, 4.0, 1.0]])
    history = torch.tensor([[0]])
    sampler = Sampler(SamplingParams(temperature=0.0, repetition_penalty=2.0))
    assert sampler(logits, history).item() == 1
    assert sampler(logits).item() == 0
    assert sampler(logits, torch.empty(1, 0, dtype=torch.int64)).item() == 0


def test_sampler_does_not_modify_logits() -> None:
    logits = _logits(12)
    before = logits.clone()
    Sampler(SamplingParams(repetition_penalty=1.3, seed=0))(logits, torch.tensor([[1, 2]] * 4))
    torch.testing.assert_close(logits, before)


@pytest.mark.parametrize(
    ("field", "value", "flag"),
    [
        ("temperature", -0.1, "--temperature"),
        ("temperature", math.nan, "--temperature"),
        ("top_k", -1, "--top-k"),
        ("top_p", 0.0, "--top-p"),
        ("top_p", 1.01, "--top-p"),
        ("min_p", -0.01, "--min-p"),
        ("min_p", 1.5, "--min-p"),
        ("repetition_penalty", 0.0, "--repetition-penalty"),
        ("repetition_penalty", -1.0, "--repetition-penalty"),
    ],
)
def test_validate_rejects_bad_values_naming_the_flag(field: str, value: float, flag: str) -> None:
    params = SamplingParams(**{field: value})
    with pytest.raises(LlmrunError, match=flag):
        params.validate()
    with pytest.raises(LlmrunError, match=flag):
        Sampler(params)


def test_validate_accepts_edges() -> None:
    for params in (
        SamplingParams(),
        SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0),
        SamplingParams(min_p=1.0, repetition_penalty=0.5),
    ):
        params.validate()


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**30])
def test_seeds_torch_cannot_take_are_refused_naming_the_flag(seed: int) -> None:
    with pytest.raises(LlmrunError, match=f"--seed {seed} is out of range: seeds go from 0 to 18446744073709551615"):
        SamplingParams(seed=seed).validate()
    with pytest.raises(LlmrunError, match="--seed"):
        Sampler(SamplingParams(seed=seed))


@pytest.mark.parametrize("seed", [0, 2**64 - 1, -1, -(2**63)])
def test_seeds_at_the_edges_of_the_range_sample(seed: int) -> None:
    """The largest seed and the negative ones torch takes (counted modulo 2^64) still seed a sampler."""
    params = SamplingParams(temperature=1.0, seed=seed, **PLAIN)
    assert torch.equal(Sampler(params)(_logits(0)), Sampler(params)(_logits(0)))
