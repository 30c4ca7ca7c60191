"""`python -m buildllm`: the same command line as the `buildllm` console script."""

import sys

from buildllm.cli import main

sys.exit(main())
