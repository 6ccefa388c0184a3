"""Text in, text out: tokenizer and chat templates, prompts, sampling, the generation loop, chat
conversations within a context window, and perplexity."""
