"""The HTTP server and its processes: app, native and OpenAI APIs, tokenizer manager, launch, CLI."""
