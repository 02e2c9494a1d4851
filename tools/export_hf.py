"""Export a checkpoint to Hugging Face (see megatron_wsm/cli/export_hf.py).

The ``__main__`` guard matters: loading/saving with torch_dist may start spawn-based helpers.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_wsm.cli.export_hf import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
