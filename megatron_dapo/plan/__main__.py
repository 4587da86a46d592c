"""`python -m megatron_dapo.plan`, as the launch scripts call it: the dapo-plan command line."""

import sys

from megatron_dapo.cli.plan import main

sys.exit(main())
