"""Record the TransformerConfig Megatron-LM builds for each model family's flags (CPU).

Megatron-LM is not part of this project: pass a checkout of it (tag ``core_v0.16.1``)::

    .venv/bin/python tests/data/megatron_lm/families/make_reference.py --mlm-dir /tmp/mlm

For each family of ``megatron_wsm.testing.families.REFERENCE_FAMILIES`` the flags (the tiny
model's sizes, then the family's) go through Megatron-LM's own ``parse_args``,
``validate_args`` and ``core_transformer_config_from_args``
(``megatron/training/arguments.py``), with the CPU shims of ``../make_fixtures.py``;
``<family>.json`` keeps the config fields megatron-wsm maps, plus the ``GPTModel`` arguments
Megatron-LM's ``gpt_builders.py`` passes. Megatron-LM's own defaults stand wherever the flags
set nothing, so the files also show where ours differ.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[3]

#: TransformerConfig fields recorded (those megatron-wsm sets from its flags).
FIELDS = (
    "num_layers hidden_size num_attention_heads num_query_groups kv_channels ffn_hidden_size "
    "hidden_dropout attention_dropout init_method_std normalization layernorm_epsilon "
    "qk_layernorm add_bias_linear add_qkv_bias attention_softmax_in_fp32 gated_linear_unit "
    "multi_latent_attention q_lora_rank kv_lora_rank qk_head_dim qk_pos_emb_head_dim v_head_dim "
    "rotary_base rotary_percent rotary_scaling_factor mscale mscale_all_dim rope_type "
    "num_moe_experts moe_ffn_hidden_size moe_layer_freq moe_router_topk "
    "moe_shared_expert_intermediate_size moe_shared_expert_overlap moe_shared_expert_gate "
    "moe_router_score_function "
    "moe_router_pre_softmax moe_router_topk_scaling_factor moe_router_num_groups "
    "moe_router_group_topk moe_router_enable_expert_bias moe_router_bias_update_rate "
    "moe_router_dtype moe_aux_loss_coeff moe_router_load_balancing_type moe_z_loss_coeff "
    "moe_expert_capacity_factor moe_token_drop_policy moe_pad_expert_input_to_capacity "
    "moe_token_dispatcher_type"
).split()


#: Fused kernels a CPU cannot run (as in ../make_fixtures.py); they change no config field
#: recorded here.
CPU_KERNELS = (
    "--no-gradient-accumulation-fusion --no-masked-softmax-fusion --no-bias-dropout-fusion "
    "--no-bias-swiglu-fusion --no-rope-fusion --no-persist-layer-norm"
).split()


def megatron_argv(family: list[str]) -> list[str]:
    """Megatron-LM's command line for a family: the tiny sizes, the family's flags, and what
    Megatron-LM needs to validate (a tokenizer, the local spec)."""
    from megatron_wsm.testing.config import TINY_MODEL

    ours_only = {"--no-progress-bar"}
    argv = [a for a in TINY_MODEL if a not in ours_only]
    return [
        *argv,
        *family,
        "--tokenizer-type",
        "NullTokenizer",
        "--transformer-impl",
        "local",
        "--max-position-embeddings",
        "32",  # ours defaults to --seq-length; Megatron-LM needs it
        "--micro-batch-size",
        "2",
        "--lr",
        "1e-3",
        "--train-iters",
        "1",
        *CPU_KERNELS,
    ]


def record(mlm_dir: Path) -> dict[str, dict]:
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(HERE.parent))
    import make_fixtures  # noqa: E402  (the CPU shims for Megatron-LM's training package)

    make_fixtures.install_shims(mlm_dir)
    from megatron.training.arguments import (
        core_transformer_config_from_args,
        parse_args,
        validate_args,
    )

    from megatron_wsm.testing.families import REFERENCE_FAMILIES

    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("RANK", "0")
    out = {}
    for name, flags in REFERENCE_FAMILIES.items():
        sys.argv = ["pretrain_gpt.py", *megatron_argv(flags)]
        args = parse_args()
        validate_args(args, {})
        config = core_transformer_config_from_args(args)
        fields = {f: getattr(config, f, None) for f in FIELDS}
        fields["activation_func"] = config.activation_func.__name__
        gpt = {
            "position_embedding_type": args.position_embedding_type,
            "rotary_base": args.rotary_base,
            "rotary_percent": args.rotary_percent,
            "share_embeddings_and_output_weights": not args.untie_embeddings_and_output_weights,
            "config_class": type(config).__name__,
        }
        out[name] = {"argv": sys.argv[1:], "transformer_config": fields, "gpt_model": gpt}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mlm-dir", type=Path, required=True)
    ns = parser.parse_args()
    for name, data in record(ns.mlm_dir).items():
        (HERE / f"{name}.json").write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        print(name)


if __name__ == "__main__":
    main()
