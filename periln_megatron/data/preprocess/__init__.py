"""JSONL -> megatron-core indexed datasets (PREFIX.bin + PREFIX.idx), Megatron-LM's preprocess_data.py
flags and bytes: ``python -m periln_megatron.data.preprocess``, ``periln-preprocess`` and
tools/preprocess_data.py are the same command (cli.py documents it).

inputs.py reads the files and parses JSONL blocks; workers.py tokenizes them in worker processes
(sentences.py: --split-sentences); writing.py writes the prefixes through PrefixWriter; pipeline.py
runs the whole and summarizes; cli.py is the command line.
"""

from periln_megatron.data.preprocess.cli import build_parser, check_flags, main
from periln_megatron.data.preprocess.inputs import InputError
from periln_megatron.data.preprocess.pipeline import print_summary, run

__all__ = ["InputError", "build_parser", "check_flags", "main", "print_summary", "run"]
