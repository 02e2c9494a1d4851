"""List the checkpoints under a directory (see megatron_wsm/cli/list_checkpoints.py)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_wsm.cli.list_checkpoints import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
