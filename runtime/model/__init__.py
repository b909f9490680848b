"""Model execution: the runner, batches, KV memory pools, attention backends, the Llama-family model, sampling."""
