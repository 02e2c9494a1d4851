#!/usr/bin/env python
"""Print or plot WSM merge coefficients and the decay they emulate (see megatron_wsm.cli)."""

import sys

from megatron_wsm.cli.wsm_weights import main

if __name__ == "__main__":
    sys.exit(main())
