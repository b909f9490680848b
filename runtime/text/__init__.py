"""Text: the tokenizer (with chat templates), incremental detokenizing, stop conditions."""
