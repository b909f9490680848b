"""Model implementations. All supported architectures share the Llama-family code."""

from radixflow.runtime.models.llama import LlamaForCausalLM

__all__ = ["LlamaForCausalLM"]
