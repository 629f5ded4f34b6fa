"""`python -m periln_megatron.train` = `periln-train` (slurm/common.sh and users' scripts call it).
The loop itself is periln_megatron/training/loop.py."""

from periln_megatron.cli import train_command

if __name__ == "__main__":
    train_command()
