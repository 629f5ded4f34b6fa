"""`python -m periln_megatron.launch` = `periln-launch`: periln_megatron/distributed/launch.py."""

import sys

from periln_megatron.distributed.launch import main

if __name__ == "__main__":
    sys.exit(main())
