"""Data: megatron-core datasets from indexed prefixes, the indexed format, tokenizers."""
