"""Hugging Face export/import for megatron-core checkpoints (tools/convert_to_hf.py, tools/convert_from_hf.py)."""
