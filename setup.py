"""megatron-wsm: MoE pretraining on megatron-core with Warmup-Stable-Merge."""

import re
from pathlib import Path

from setuptools import find_packages, setup

# The version is written once, in megatron_wsm/__init__.py; read, not imported (no dependencies
# are installed yet when this runs).
_INIT = (Path(__file__).resolve().parent / "megatron_wsm" / "__init__.py").read_text()
VERSION = re.search(r'^__version__ = "([^"]+)"$', _INIT, re.MULTILINE).group(1)

setup(
    name="megatron-wsm",
    version=VERSION,
    description="Megatron-style MoE pretraining with Warmup-Stable-Merge checkpoint merging",
    packages=find_packages(include=["megatron_wsm", "megatron_wsm.*"]),
    python_requires=">=3.10",
    install_requires=[
        # >= 2.6 for torch.distributed.checkpoint as megatron-core 0.16 uses it; < 2.15 because
        # the CPU shims were checked up to 2.13/2.14. On CPU-only machines install the CPU
        # build first (`pip install torch==2.13.0` here), or pip pulls a multi-GB CUDA build.
        "torch>=2.6,<2.15",
        # 0.16.1 (the newest with Python 3.11 wheels) is the CPU baseline the shims in
        # megatron_wsm.cpu_compat were checked on; 0.17-0.19 need Python >= 3.12 and are
        # handled by signature/version checks (async save strategy), GPU-only so far.
        "megatron-core>=0.16.1,<0.20",
        "sentencepiece>=0.2,<0.3",  # tokenizer of the embedded corpus and users' data
        "tensorboard>=2.16,<3",  # SummaryWriter + event reader for tests
        "numpy>=1.26,<3",
        "scipy>=1.11,<2",  # NNLS and Nelder-Mead of the annealing-law fit
        "tqdm>=4.66",  # progress bars
        "matplotlib>=3.8,<4",  # plots of merge weights and loss curves
        "psutil>=5.9",  # megatron-core's checkpoint writers need it but do not declare it
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]>=2.0"],  # optional fused GPU layers (TE spec)
        "dev": ["pytest>=8", "hypothesis>=6.100", "ruff>=0.6"],
        # Weights & Biases logging (--wandb-project); tests run it offline (0.31 checked).
        "wandb": ["wandb>=0.17"],
        # Hugging Face export (tools/export_hf.py) and offline downstream scoring. The trainer
        # never imports these. transformers >= 5: the tokenizer parity (AutoTokenizer ids equal
        # to SentencePiece's) was checked with 5.x only.
        "hf": ["transformers>=5.0,<6", "safetensors>=0.4.3,<1", "lm-eval[hf]>=0.4.5,<0.5"],
        # --tokenizer-type TikTokenizer (megatron-core's tiktoken tokenizer; 0.14 checked).
        "tiktoken": ["tiktoken>=0.7,<1"],
    },
    entry_points={
        "console_scripts": [
            "wsm-pretrain=megatron_wsm.pretrain:main",
            "wsm-weights=megatron_wsm.cli.wsm_weights:main",
            "wsm-merge=megatron_wsm.cli.merge_wsm:main",
            "wsm-evaluate=megatron_wsm.cli.evaluate:main",
            "wsm-list-checkpoints=megatron_wsm.cli.list_checkpoints:main",
            "wsm-train-tokenizer=megatron_wsm.cli.train_tokenizer:main",
            "wsm-preprocess-data=megatron_wsm.cli.preprocess_data:main",
            "wsm-export-hf=megatron_wsm.cli.export_hf:main",
            "wsm-eval-harness=megatron_wsm.export.harness:main",
        ]
    },
)
