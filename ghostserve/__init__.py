"""ghostserve: erasure-coded KV-cache checkpointing for tensor-parallel LLM serving."""

__version__ = "0.1.0"
