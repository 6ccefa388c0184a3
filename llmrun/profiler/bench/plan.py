"""Which bench tests to run: ``BenchTest`` and the plan of pp, tg and pp+tg tests per batch size."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llmrun.errors import LlmrunError
from llmrun.model.transformer import Transformer
from llmrun.profiler.measure import check_memory


@dataclass(frozen=True)
class BenchTest:
    """One llama-bench test: ``n_prompt`` prompt tokens then ``n_gen`` decode steps, per sequence, in a
    KV cache of ``n_ctx`` positions (0: just the positions the test fills), on ``threads`` CPU threads
    (0: torch's current number)."""

    n_prompt: int
    n_gen: int
    batch: int = 1
    n_ctx: int = 0
    threads: int = 0

    @property
    def positions(self) -> int:
        """The KV cache's capacity in positions: ``n_ctx``, at least what the test fills."""
        return max(self.n_ctx, self.n_prompt + self.n_gen)

    @property
    def name(self) -> str:
        """``pp512``, ``tg128`` or ``pp512+tg128``, as llama-bench names them."""
        parts = [f"pp{self.n_prompt}"] * bool(self.n_prompt) + [f"tg{self.n_gen}"] * bool(self.n_gen)
        return "+".join(parts)

    @property
    def tokens(self) -> int:
        """Tokens one repetition processes: B·(n_prompt + n_gen)."""
        return self.batch * (self.n_prompt + self.n_gen)


def plan_tests(
    prompts: Sequence[int],
    gens: Sequence[int],
    pairs: Sequence[tuple[int, int]],
    batches: Sequence[int],
    n_ctx: int = 0,
    threads: Sequence[int] = (0,),
) -> list[BenchTest]:
    """Every combination, as llama-bench runs them: for each batch size, for each thread count, pp for
    each prompt length, tg for each generation length, then the pp+tg pairs.

    Lengths of 0 are skipped (``-p 0`` runs no pp test); batch sizes must be at least 1. ``n_ctx``
    is every test's KV cache capacity (0: what each fills); a thread count of 0 keeps torch's.
    """
    if not batches or min(batches) < 1:
        raise LlmrunError("--batch must be at least 1")
    tests = []
    for b in batches:
        for t in threads:
            tests += [BenchTest(n, 0, b, n_ctx, t) for n in prompts if n > 0]
            tests += [BenchTest(0, n, b, n_ctx, t) for n in gens if n > 0]
            tests += [BenchTest(p, g, b, n_ctx, t) for p, g in pairs if p > 0 or g > 0]
    if not tests:
        raise LlmrunError("nothing to run: give -p, -n or -pg with a length above 0")
    return tests


def check_tests(model: Transformer, tests: Sequence[BenchTest]) -> None:
    """Refuse tests longer than the model's context window, or whose KV cache and activations do not
    fit in the memory free (before anything is measured)."""
    limit = model.args.context_length
    for test in tests:
        if test.positions > limit:
            raise LlmrunError(f"{test.name} needs {test.positions} positions but the model's context is {limit}")
        check_memory(model, test.batch, test.n_prompt, test.positions, f"{test.name} at batch {test.batch}")
