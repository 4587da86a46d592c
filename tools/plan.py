"""dapo-plan: will a DAPO run fit, and how long will a step take (megatron_dapo/plan/)."""

import sys

from megatron_dapo.cli.plan import main

sys.exit(main())
