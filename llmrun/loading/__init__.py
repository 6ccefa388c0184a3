"""Where models come from and how they get onto a device: model sources (directory, hub, GGUF,
default), safetensors reading and writing, the loader, presets with random weights, GGUF import,
and the session that puts a model and its tokenizer together."""
