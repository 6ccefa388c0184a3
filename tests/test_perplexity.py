"""``llmrun perplexity`` against the same windows scored by transformers (within 0.1%)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from llmrun.cli.app import run
from llmrun.generation.perplexity import windows

TEXT = (
    "The roofline model bounds the performance of a kernel by the smaller of two ceilings: the peak "
    "arithmetic throughput of the processor and the product of the kernel's arithmetic intensity with "
    "the peak memory bandwidth. Decoding one token at a time reads every weight once, so its intensity "
    "is about one floating-point operation per byte and it runs at the speed of memory. Prefill processes "
    "hundreds of tokens per weight read and is limited by arithmetic instead.\n"
) * 3


def _hf_perplexity(hf_model, ids: list[int], context: int) -> float:
    nll, count = 0.0, 0
    for chunk in windows(ids, context):
        tokens = torch.tensor([chunk])
        with torch.inference_mode():
            logits = hf_model(tokens).logits[0, :-1].float()
        nll += F.cross_entropy(logits, tokens[0, 1:], reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(nll / count)


@pytest.mark.slow
def test_perplexity_cli_matches_transformers(smollm2_dir, smollm2_hf, tmp_path, capsys):
    from llmrun.generation.tokenizer import Tokenizer

    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    # the float weights transformers reads (the default GGUF otherwise runs quantized, on bf16 activations)
    argv = ["perplexity", str(text_file), "--context", "64", "--device", "cpu", "--dtype", "fp32", "--quant", "none"]
    code = run([*argv, "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    ids = Tokenizer.from_dir(smollm2_dir).encode(TEXT)
    expected = _hf_perplexity(smollm2_hf, ids, 64)
    assert result["tokens"] == sum(len(w) - 1 for w in windows(ids, 64))
    assert result["perplexity"] == pytest.approx(expected, rel=1e-3)
    # A trained model on plain English: far below the uniform perplexity of its 49152-token vocabulary.
    assert 1.0 < result["perplexity"] < 1000.0


def test_windows_cover_every_token_once():
    ids = list(range(10))
    assert windows(ids, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert windows(list(range(9)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a 1-token tail predicts nothing
