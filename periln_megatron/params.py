"""`python -m periln_megatron.params RECIPE ...` = `periln-params`."""

import sys

from periln_megatron.cli import params_main

if __name__ == "__main__":
    sys.exit(params_main())
