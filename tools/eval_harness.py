"""Score an exported model with lm-evaluation-harness, offline (see megatron_wsm/export/harness.py).

``python tools/eval_harness.py --model runs/x/hf --output-json harness.json``: the held-out
perplexity and cloze tasks, built from the embedded corpus (nothing is downloaded).
"""

import os
import sys

# Like tools/export_hf.py: runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_wsm.export.harness import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
