"""``llmrun pull``: download a hub model ahead of time into the Hugging Face cache.

Fetches what llmrun needs and nothing else: config, tokenizer and chat-template files, and the
safetensors shards the index names (never ``*.bin``/``*.pt``). It goes through
``huggingface_hub`` (its cache and progress bars; ``HF_TOKEN`` for gated repos, ``HF_HUB_OFFLINE=1``
to forbid the network), so later commands find the model offline.

Examples:

    llmrun pull HuggingFaceTB/SmolLM2-360M-Instruct
    HF_TOKEN=hf_... llmrun pull meta-llama/Llama-3.2-1B --revision main
"""

from __future__ import annotations

from typing import Annotated

import typer

from llmrun.cli.options import RevisionOption
from llmrun.errors import LlmrunError


def pull(
    repo_id: Annotated[str, typer.Argument(help="Hub repo id ORG/NAME.", show_default=False)],
    revision: RevisionOption = None,
) -> None:
    """Download ORG/NAME's weights, config and tokenizer; print the local directory."""
    from llmrun.loading.sources import download, is_hub_id

    if not is_hub_id(repo_id):
        raise LlmrunError(f"{repo_id!r} is not a hub repo id; expected ORG/NAME (e.g. HuggingFaceTB/SmolLM2-135M)")
    print(download(repo_id, revision=revision))
