"""kvtier: tiered KV-cache memory for LLM serving."""

__version__ = "0.1.0"
