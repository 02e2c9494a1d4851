"""megatron-wsm: MoE pretraining on megatron-core with Warmup-Stable-Merge.

Importing the package does nothing else: the modules that use megatron-core import
:mod:`megatron_wsm.mcore_prelude` (its CPU import shims) themselves, so the pure ones
(configuration, merge math, the annealing planner) load neither torch nor megatron-core.
"""

#: The package version, written here only (``setup.py`` reads it from this line).
__version__ = "0.1.0"
