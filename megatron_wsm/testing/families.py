"""Tiny models of the MoE families Megatron-LM's own scripts define, as trainer flags.

Each list holds the model-defining flags of one Megatron-LM script (core_v0.16.1) with tiny
sizes; append them to :data:`megatron_wsm.testing.config.TINY_MODEL` (whose sizes they keep
unless they set their own). Sources: Mixtral — ``examples/mixtral/
train_mixtral_8x7b_distributed.sh``; Qwen3-MoE — ``examples/post_training/modelopt/conf/Qwen/
Qwen3-30B-A3B.sh``; DeepSeek — ``examples/post_training/modelopt/conf/deepseek-ai/
DeepSeek-V2-Lite.sh`` and ``DeepSeek-R1.sh`` (V3 architecture: query LoRA, sigmoid router with
expert bias, group-limited routing); Qwen2-MoE (no Megatron-LM script) — the Qwen3 flags with
Qwen1.5/Qwen2-MoE's differences (:data:`QWEN2`).
"""

from __future__ import annotations

#: Megatron-LM's Mixtral model flags (its sizes replaced by TINY_MODEL's).
MIXTRAL = (
    "--disable-bias-linear --position-embedding-type rope --no-position-embedding "
    "--normalization RMSNorm --swiglu --untie-embeddings-and-output-weights "
    "--group-query-attention --num-query-groups 2 --rotary-base 1000000 --init-method-std "
    "0.01 --attention-dropout 0.0 --hidden-dropout 0.0 --moe-router-load-balancing-type "
    "aux_loss --moe-aux-loss-coeff 1e-2 --moe-token-dispatcher-type alltoall"
).split()
#: Qwen3-MoE: GQA with its own head width (kv-channels 16 ≠ hidden/heads 8), qk-layernorm.
QWEN3 = (
    "--disable-bias-linear --untie-embeddings-and-output-weights --position-embedding-type "
    "rope --normalization RMSNorm --norm-epsilon 1e-6 --swiglu --group-query-attention "
    "--num-query-groups 2 --kv-channels 16 --qk-layernorm --moe-ffn-hidden-size 24 "
    "--moe-router-dtype fp32 --moe-aux-loss-coeff 1e-3 --moe-router-load-balancing-type "
    "aux_loss --rotary-percent 1.0 --rotary-base 1000000"
).split()
#: DeepSeek-V3-style: MLA (query LoRA too), qk-layernorm, a dense first layer, shared experts,
#: sigmoid router with the aux-loss-free expert bias, group-limited routing, seq_aux_loss.
DEEPSEEK = (
    "--num-layers 3 --disable-bias-linear --untie-embeddings-and-output-weights "
    "--position-embedding-type rope --normalization RMSNorm --norm-epsilon 1e-6 --swiglu "
    "--multi-latent-attention --q-lora-rank 16 --kv-lora-rank 16 --qk-head-dim 8 "
    "--qk-pos-emb-head-dim 8 --v-head-dim 8 --qk-layernorm --kv-channels 16 "
    "--rotary-scaling-factor 40 --mscale 0.707 --mscale-all-dim 0.707 --moe-layer-freq "
    "([0]+[1]*2) --ffn-hidden-size 64 --moe-ffn-hidden-size 16 "
    "--moe-shared-expert-intermediate-size 32 --moe-router-score-function sigmoid "
    "--moe-router-enable-expert-bias --moe-router-bias-update-rate 1e-2 "
    "--moe-router-num-groups 2 --moe-router-group-topk 1 --moe-router-topk-scaling-factor 2.5 "
    "--moe-router-load-balancing-type seq_aux_loss --moe-aux-loss-coeff 1e-3"
).split()
FAMILY_LAYOUTS = {
    # family: (flags, a 2-process layout, global 0-based indices of the MoE layers)
    "mixtral": (MIXTRAL, ["--expert-model-parallel-size", "2"], [0, 1]),
    "qwen3_moe": (QWEN3, ["--tensor-model-parallel-size", "2", "--sequence-parallel"], [0, 1]),
    "deepseek": (DEEPSEEK, ["--expert-model-parallel-size", "2"], [1, 2]),
}
#: DeepSeek-V2-Lite as its script has it: MLA without query LoRA, the softmax router with
#: pre-softmax top-k and a scaling factor, the dense first layer, shared experts; its dropout,
#: softmax-in-fp32 and dispatcher flags given, as there.
DEEPSEEK_V2_LITE = (
    "--num-layers 3 --attention-dropout 0.0 --hidden-dropout 0.0 --disable-bias-linear "
    "--untie-embeddings-and-output-weights --position-embedding-type rope --normalization "
    "RMSNorm --norm-epsilon 1e-6 --swiglu --ffn-hidden-size 64 --kv-channels 16 "
    "--multi-latent-attention --kv-lora-rank 16 --v-head-dim 8 --qk-head-dim 8 --qk-layernorm "
    "--qk-pos-emb-head-dim 8 --moe-layer-freq ([0]+[1]*2) --moe-ffn-hidden-size 16 "
    "--moe-router-score-function softmax --moe-router-topk-scaling-factor 1.0 "
    "--moe-router-pre-softmax --moe-shared-expert-intermediate-size 32 --moe-aux-loss-coeff "
    "1e-3 --moe-token-dispatcher-type alltoall --moe-token-drop-policy probs "
    "--moe-router-load-balancing-type seq_aux_loss --attention-softmax-in-fp32 "
    "--rotary-percent 1.0 --rotary-base 10000 --rotary-scaling-factor 40 --mscale 0.707 "
    "--mscale-all-dim 0.707"
).split()
#: Qwen1.5-MoE / Qwen2-57B-A14B-style (Megatron-LM has no script for them; the flags of the
#: Qwen3 script above with Qwen2-MoE's differences, as Megatron-Bridge's Qwen2-MoE provider
#: sets them): QKV bias, a shared expert scaled by a sigmoid gate, the softmax router's top-k
#: not renormalised (pre-softmax), no qk-layernorm.
QWEN2 = (
    "--disable-bias-linear --add-qkv-bias --untie-embeddings-and-output-weights "
    "--position-embedding-type rope --normalization RMSNorm --norm-epsilon 1e-6 --swiglu "
    "--group-query-attention --num-query-groups 2 --moe-ffn-hidden-size 24 "
    "--moe-shared-expert-intermediate-size 32 --moe-shared-expert-gate --moe-router-pre-softmax "
    "--moe-router-dtype fp32 --moe-aux-loss-coeff 1e-3 --moe-router-load-balancing-type aux_loss "
    "--moe-token-dispatcher-type alltoall --rotary-percent 1.0 --rotary-base 1000000"
).split()
#: Every family's flags whose config is checked against Megatron-LM's (tests/data/megatron_lm/
#: families/); the 2-process runs take FAMILY_LAYOUTS.
REFERENCE_FAMILIES = {
    **{name: flags for name, (flags, _layout, _moe) in FAMILY_LAYOUTS.items()},
    "deepseek_v2_lite": DEEPSEEK_V2_LITE,
    "qwen2_moe": QWEN2,
}
