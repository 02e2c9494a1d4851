"""Pretrain a Mixture-of-Experts GPT on megatron-core with Warmup-Stable-Merge.

    torchrun --nproc-per-node 2 pretrain_moe.py --expert-model-parallel-size 2 ...

See ``--help`` and README.md. The ``__main__`` guard matters: torch_dist checkpoint saving
starts a spawn-based multiprocessing manager that re-imports this file.
"""

import sys

from megatron_wsm.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
