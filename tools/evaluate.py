"""Evaluate a checkpoint on the held-out split (see megatron_wsm/cli/evaluate.py).

The ``__main__`` guard matters: loading/saving with torch_dist may start spawn-based helpers.
"""

import sys

from megatron_wsm.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
