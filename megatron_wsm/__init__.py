"""megatron-wsm: MoE pretraining on megatron-core with Warmup-Stable-Merge."""

import warnings

__version__ = "0.1.0"

# megatron-core warns at import time, once per module, that the optional GPU accelerators are
# missing; on CPU that is expected (we use its local layers), so say it once ourselves instead.
for _message in (
    r"Transformer Engine and Apex are not installed.*",
    r"Apex is not installed.*",
    r".*Transformer Engine is not installed.*",
):
    warnings.filterwarnings("ignore", message=_message, category=UserWarning)
