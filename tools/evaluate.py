"""Evaluate a checkpoint on the held-out split (see megatron_wsm/cli/evaluate.py).

The ``__main__`` guard matters: loading/saving with torch_dist may start spawn-based helpers.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_wsm.cli.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
