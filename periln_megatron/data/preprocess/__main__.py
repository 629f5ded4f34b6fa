import sys

from periln_megatron.data.preprocess.cli import MODULE_PROG, main

sys.exit(main(prog=MODULE_PROG))
