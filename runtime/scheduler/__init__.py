"""Scheduling: admission, batching, retraction, the KV cache bookkeeping and grammars of running requests."""
