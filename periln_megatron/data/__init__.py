"""Data: megatron-core datasets from indexed prefixes (datasets.py), the indexed format (indexed.py),
tokenizers (tokenizers/, and tokenizers/train.py: training one), preprocessing JSONL into prefixes
(preprocess/) and inspecting a prefix (inspect.py)."""
