"""One checkpoint key scheme for the local and TE specs; fusion and flag decisions."""

from __future__ import annotations

import types

import pytest
import torch

from megatron_wsm.arguments import ConfigError, parse_run_config, validate_accelerator_flags
from megatron_wsm.checkpoint import keys as spec_keys
from megatron_wsm.model import (
    FusionKernels,
    SequenceParallelTorchNorm,
    decide_fusions,
)

L = "decoder.layers."


@pytest.mark.parametrize(
    ("new", "old"),
    [
        (
            L + "self_attention.linear_qkv.layer_norm_weight",
            L + "self_attention.linear_qkv.layer_norm_norm.weight",
        ),  # noqa: E501
        (
            L + "self_attention.linear_qkv.layer_norm_bias",
            L + "self_attention.linear_qkv.layer_norm_norm.bias",
        ),  # noqa: E501
        (L + "pre_mlp_layernorm.weight", L + "mlp.linear_fc1.layer_norm_norm.weight"),
        (L + "mlp.linear_fc1.layer_norm_weight", L + "mlp.linear_fc1.layer_norm_norm.weight"),
        ("decoder.final_layernorm.weight", "decoder.final_layernorm.norm.weight"),
        ("decoder.final_layernorm.bias", "decoder.final_layernorm.norm.bias"),
        (
            "optimizer.state.exp_avg.decoder.final_layernorm.weight",
            "optimizer.state.exp_avg.decoder.final_layernorm.norm.weight",
        ),
    ],
)
def test_legacy_key_maps_te_names_to_the_old_local_names(new, old):
    assert spec_keys.legacy_key(new) == old


@pytest.mark.parametrize(
    "key",
    [
        L + "self_attention.linear_qkv.weight",
        L + "mlp.linear_fc1.weight",
        L + "mlp.experts.experts.linear_fc1.weight",
        L + "mlp.router.weight",
        "output_layer.weight",
        "decoder.final_layernorm.norm.weight",  # already old: nothing further
        "xfinal_layernorm.weight",  # a name merely ending alike is left alone
    ],
)
def test_legacy_key_leaves_other_keys(key):
    assert spec_keys.legacy_key(key) is None


@pytest.mark.parametrize(
    ("key", "norm"),
    [
        (L + "self_attention.linear_qkv.layer_norm_weight", True),
        (L + "mlp.linear_fc1.layer_norm_weight", True),
        (L + "pre_mlp_layernorm.weight", True),
        ("decoder.final_layernorm.weight", True),
        (L + "self_attention.linear_qkv.layer_norm_norm.weight", True),
        ("decoder.final_layernorm.norm.weight", True),
        (L + "self_attention.q_layernorm.weight", True),
        (L + "self_attention.linear_qkv.weight", False),
        (L + "mlp.router.weight", False),
        (L + "mlp.experts.experts.linear_fc2.weight", False),
        ("embedding.word_embeddings.weight", False),
    ],
)
def test_norm_keys_are_recognised_under_both_namings(key, norm):
    assert spec_keys.is_norm_param_key(key) is norm


def test_te_spec_keys_follow_megatron_cores_spec():
    moe = spec_keys.te_spec_param_keys(4, "RMSNorm")
    # TE's MoE layer keeps a separate pre-MLP norm; its dense layer fuses it into fc1.
    assert L + "pre_mlp_layernorm.weight" in moe
    assert L + "mlp.linear_fc1.layer_norm_weight" not in moe
    assert L + "self_attention.linear_qkv.layer_norm_weight" in moe
    assert L + "mlp.experts.experts.linear_fc1.weight" in moe
    assert L + "mlp.router.weight" in moe
    assert "decoder.final_layernorm.weight" in moe
    assert not [k for k in moe if k.endswith("bias")]
    dense = spec_keys.te_spec_param_keys(None, "LayerNorm")
    assert L + "mlp.linear_fc1.layer_norm_weight" in dense
    assert L + "mlp.linear_fc1.layer_norm_bias" in dense
    assert L + "pre_mlp_layernorm.weight" not in dense
    assert "decoder.final_layernorm.bias" in dense
    tied = spec_keys.te_spec_param_keys(4, untie_embeddings_and_output_weights=False)
    assert "output_layer.weight" not in tied


def test_te_spec_derivation_leaves_megatron_core_as_it_was():
    from megatron.core.models.gpt import gpt_layer_specs as gls

    had = "TESpecProvider" in gls.__dict__
    spec_keys.te_spec_param_keys(4)
    assert ("TESpecProvider" in gls.__dict__) == had


def _tensor(key):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return ShardedTensor.from_rank_offsets(key, torch.ones(2))


def test_adapt_load_request_renames_only_what_the_checkpoint_holds_under_old_names():
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedObject

    qkv = L + "self_attention.linear_qkv.layer_norm_weight"
    final = "decoder.final_layernorm.weight"
    sharded = {
        "a": _tensor(qkv),
        "b": _tensor(final),
        "c": _tensor("output_layer.weight"),
        "d": ShardedObject(L + "self_attention.core_attention._extra_state", b"te", (1,), (0,)),
        "e": ShardedObject(L + "self_attention.linear_qkv._extra_state", None, (1,), (0,)),
    }
    stored = {
        spec_keys.legacy_key(qkv),
        final,  # already the new name: left as is
        "output_layer.weight",
        L + "self_attention.linear_qkv._extra_state",
    }
    changed = spec_keys.adapt_load_request(sharded, stored)
    assert sharded["a"].key == spec_keys.legacy_key(qkv)
    assert sharded["b"].key == final
    assert sharded["c"].key == "output_layer.weight"
    assert isinstance(sharded["d"], LocalNonpersistentObject) and sharded["d"].unwrap() == b"te"
    assert isinstance(sharded["e"], ShardedObject)
    assert len(changed["renamed"]) == 1 and len(changed["kept_local"]) == 1


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
def test_sp_norm_computes_what_torch_norms_compute(normalization):
    cfg = types.SimpleNamespace(
        normalization=normalization, params_dtype=torch.float32, sequence_parallel=True
    )
    norm = SequenceParallelTorchNorm(cfg, 16, eps=1e-5)
    ref = torch.nn.RMSNorm(16, eps=1e-5) if normalization == "RMSNorm" else torch.nn.LayerNorm(16)
    with torch.no_grad():
        for p in (norm.weight, ref.weight):
            p.copy_(torch.linspace(0.5, 1.5, 16))
        if norm.bias is not None:
            norm.bias.fill_(0.25)
            ref.bias.fill_(0.25)
    x = torch.randn(3, 2, 16)
    assert torch.equal(norm(x), ref(x))
    names = sorted(n for n, _ in norm.named_parameters())
    assert names == (["weight"] if normalization == "RMSNorm" else ["bias", "weight"])
    assert all(p.sequence_parallel for p in norm.parameters())


def test_fusions_stay_off_without_their_kernels():
    # bf16 on a GPU without TE/apex: the local softmax must not reach the CUDA extension.
    bare_gpu = decide_fusions(FusionKernels(cuda=True))
    assert not any(bare_gpu.values())
    assert not any(decide_fusions(FusionKernels(cuda=False, transformer_engine=True)).values())


def test_each_fusion_follows_its_own_kernel():
    full = decide_fusions(
        FusionKernels(
            cuda=True,
            transformer_engine=True,
            masked_softmax=True,
            wgrad_accumulation=True,
            triton=True,
        )
    )
    assert all(full.values())
    te_only = decide_fusions(FusionKernels(cuda=True, transformer_engine=True))
    assert te_only == {
        "masked_softmax_fusion": False,
        "apply_rope_fusion": True,
        "bias_dropout_fusion": False,
        "gradient_accumulation_fusion": False,
    }
    apex = decide_fusions(FusionKernels(cuda=True, masked_softmax=True, wgrad_accumulation=True))
    assert apex["masked_softmax_fusion"] and apex["gradient_accumulation_fusion"]
    assert not apex["apply_rope_fusion"]


def test_probe_on_a_cpu_machine_enables_nothing():
    from megatron_wsm.model import probe_fusion_kernels

    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    assert probe_fusion_kernels() == FusionKernels()


def test_grouped_gemm_is_accepted_with_a_note_without_te():
    """--moe-grouped-gemm only selects the experts' kernel: noted once where TE is not usable,
    silent (and honoured) where it is; without experts it is still an error."""
    from megatron_wsm.accelerators import GROUPED_GEMM_NO_EFFECT

    cfg, _ = parse_run_config(["--moe-grouped-gemm"])
    assert cfg.model.moe_grouped_gemm
    validate_accelerator_flags(cfg, cuda=False, te=False)
    validate_accelerator_flags(cfg, cuda=True, te=True)
    assert cfg.model.accelerator_notes(te=False) == [GROUPED_GEMM_NO_EFFECT]
    assert GROUPED_GEMM_NO_EFFECT.startswith("accepted, no effect here: --moe-grouped-gemm")
    assert cfg.model.accelerator_notes(te=True) == []
    plain, _ = parse_run_config([])
    assert plain.model.accelerator_notes(te=False) == []
    dense, _ = parse_run_config(["--moe-grouped-gemm", "--num-experts", "0"])
    with pytest.raises(ConfigError, match="needs --num-experts"):
        validate_accelerator_flags(dense, cuda=True, te=True)


def test_grouped_gemm_reaches_megatron_core_only_with_te():
    """megatron-core gets moe_grouped_gemm only with TE's kernels (without, its local spec
    builds SequentialMLP experts, the keys of a run without the flag; the 2-process run of
    Megatron-LM's Mixtral script in tests/distributed/test_megatron_lm_scripts.py passes it)."""
    from megatron_wsm.model import build_layer_spec
    from megatron_wsm.model.transformer_config import transformer_config_kwargs

    cfg, _ = parse_run_config(["--moe-grouped-gemm"])
    te = FusionKernels(cuda=True, transformer_engine=True)
    assert transformer_config_kwargs(cfg.model, cfg.parallel, te, True)[1]["moe_grouped_gemm"]
    _, cpu = transformer_config_kwargs(cfg.model, cfg.parallel, FusionKernels(), False)
    assert cpu["moe_grouped_gemm"] is False
    if torch.cuda.is_available():
        pytest.skip("CPU-only check of the local spec")
    # A config that still asked for it would make megatron-core's local spec build the legacy
    # GroupedMLP (another checkpoint layout): refused.
    forced = types.SimpleNamespace(moe_grouped_gemm=True)
    with pytest.raises(ValueError, match="needs the TE spec"):
        build_layer_spec(forced, cfg.model)  # type: ignore[arg-type]


def test_overlap_flags_pass_validation_only_together_with_the_distributed_optimizer():
    cfg, _ = parse_run_config(["--overlap-grad-reduce", "--overlap-param-gather"])
    assert cfg.parallel.overlap_grad_reduce and cfg.parallel.overlap_param_gather
    with pytest.raises(ConfigError, match="needs --use-distributed-optimizer"):
        validate_accelerator_flags(cfg, cuda=True, te=True)
    cfg.parallel.use_distributed_optimizer = True
    validate_accelerator_flags(cfg, cuda=True, te=True)
    cfg.parallel.overlap_grad_reduce = False
    with pytest.raises(ConfigError, match="needs --overlap-grad-reduce"):
        validate_accelerator_flags(cfg, cuda=True, te=True)


def test_async_saves_ask_for_megatron_cores_own_strategy_where_there_is_a_choice():
    from megatron_wsm.checkpoint.manager import async_save_kwargs

    def save_016(
        sharded_state_dict, checkpoint_dir, sharded_strategy=None, async_sharded_save=False
    ):
        return None

    def save_017(
        sharded_state_dict, checkpoint_dir, async_sharded_save=False, async_strategy="nvrx"
    ):
        return None

    assert async_save_kwargs(save_016) == {}
    assert async_save_kwargs(save_017) == {"async_strategy": "mcore"}
