"""Several load-balancing types at once, as Megatron-LM takes them (core_v0.16.1,
``--moe-router-load-balancing-type`` and ``--moe-aux-loss-coeff`` with ``nargs='+'``): parsing,
the one-value unwrap of ``validate_args``, the refusals made before start-up, what megatron-core
receives, the Megatron-LM ``args`` written into checkpoints, and a forward/backward of a tiny
model that logs (and back-propagates) both aux losses."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from megatron_wsm.arguments import parse_run_config
from megatron_wsm.checkpoint.megatron_args import megatron_lm_args
from megatron_wsm.config import ConfigError, RunConfig
from megatron_wsm.testing.config import tiny_run_config

TWO_TYPES = [
    "--moe-router-load-balancing-type", "aux_loss", "seq_aux_loss",
    "--moe-aux-loss-coeff", "1e-2", "1e-3",
]  # fmt: skip


def _validated(*flags: str) -> RunConfig:
    cfg = tiny_run_config(*flags)
    cfg.validate(world_size=1, cuda=False)
    return cfg


def test_one_value_stays_a_plain_str_and_float():
    """Megatron-LM's validate_args unwraps one-element lists: manifests stay as before."""
    default = _validated().model
    assert default.moe_router_load_balancing_type == "aux_loss"
    assert default.moe_aux_loss_coeff == 0.01 and isinstance(default.moe_aux_loss_coeff, float)
    one = _validated(
        "--moe-router-load-balancing-type", "seq_aux_loss", "--moe-aux-loss-coeff", "1e-3"
    ).model
    assert one.moe_router_load_balancing_type == "seq_aux_loss"
    assert one.moe_aux_loss_coeff == 1e-3 and isinstance(one.moe_aux_loss_coeff, float)
    assert one.to_json()["moe_router_load_balancing_type"] == "seq_aux_loss"


def test_several_types_are_lists_and_reach_megatron_core_as_lists():
    from megatron_wsm.model import FusionKernels, build_transformer_config

    cfg = _validated(*TWO_TYPES)
    m = cfg.model
    assert m.moe_router_load_balancing_type == ["aux_loss", "seq_aux_loss"]
    assert m.moe_aux_loss_coeff == [1e-2, 1e-3]
    assert all(isinstance(c, float) for c in m.moe_aux_loss_coeff)
    tc = build_transformer_config(m, cfg.parallel, FusionKernels())
    assert tc.moe_router_load_balancing_type == ["aux_loss", "seq_aux_loss"]
    assert tc.moe_aux_loss_coeff == [1e-2, 1e-3]
    # the manifest's run config round-trips the lists
    back = RunConfig.from_json(cfg.to_json()).model
    assert back.moe_router_load_balancing_type == ["aux_loss", "seq_aux_loss"]
    assert back.moe_aux_loss_coeff == [1e-2, 1e-3]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--moe-router-load-balancing-type", "aux_loss", "seq_aux_loss"],
         r"one value per --moe-router-load-balancing-type: 2 type\(s\) \(aux_loss "
         r"seq_aux_loss\) but 1 coefficient\(s\) \(0.01\)"),
        (["--moe-aux-loss-coeff", "1e-2", "1e-3"],
         r"1 type\(s\) \(aux_loss\) but 2 coefficient\(s\)"),
        (["--moe-router-load-balancing-type", "aux_loss", "seq_aux_loss", "global_aux_loss",
          "--moe-aux-loss-coeff", "1e-2", "1e-3"], r"3 type\(s\).*but 2 coefficient"),
        (["--moe-router-load-balancing-type", "aux_loss", "sinkhorn",
          "--moe-aux-loss-coeff", "1e-2", "0"], "sinkhorn cannot be combined"),
        (["--moe-router-load-balancing-type", "seq_aux_loss", "seq_aux_loss",
          "--moe-aux-loss-coeff", "1e-2", "1e-3"], "repeats seq_aux_loss"),
        # the existing sinkhorn rules still hold
        (["--moe-router-load-balancing-type", "sinkhorn"], "sinkhorn has no auxiliary loss"),
        (["--moe-router-load-balancing-type", "sinkhorn", "--moe-aux-loss-coeff", "0",
          "--moe-expert-capacity-factor", "1.0"], "not sinkhorn"),
    ],
)  # fmt: skip
def test_mismatches_are_refused_before_start_with_one_message(flags, message):
    cfg = tiny_run_config(*flags)
    with pytest.raises(ConfigError, match=message):
        cfg.validate(world_size=1, cuda=False)


def test_sinkhorn_alone_with_zero_coefficient_and_none_in_a_list_pass():
    _validated("--moe-router-load-balancing-type", "sinkhorn", "--moe-aux-loss-coeff", "0")
    cfg = _validated(
        "--moe-router-load-balancing-type", "none", "global_aux_loss",
        "--moe-aux-loss-coeff", "0", "1e-3",
    )  # fmt: skip
    assert cfg.model.moe_router_load_balancing_type == ["none", "global_aux_loss"]


def test_load_balancing_coeffs_pairs_types_and_values_as_megatron_core():
    from megatron_wsm.config.model import load_balancing_coeffs

    assert load_balancing_coeffs("seq_aux_loss", 1e-3) == {"seq_aux_loss": 1e-3}
    two = _validated(*TWO_TYPES).model
    pairs = load_balancing_coeffs(two.moe_router_load_balancing_type, two.moe_aux_loss_coeff)
    assert pairs == {"aux_loss": 1e-2, "seq_aux_loss": 1e-3}
    with pytest.raises(ValueError):
        load_balancing_coeffs(["aux_loss", "seq_aux_loss"], [1e-2])


def test_argparse_refuses_an_unknown_type_and_a_non_number(capsys):
    with pytest.raises(SystemExit):
        parse_run_config(["--moe-router-load-balancing-type", "aux_loss", "switch"])
    assert "invalid choice: 'switch'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_run_config(["--moe-aux-loss-coeff", "1e-2", "lots"])
    assert "invalid float value: 'lots'" in capsys.readouterr().err


def test_checkpoint_args_carry_megatron_lms_values():
    """The Megatron-LM ``args`` written into checkpoints: a list where Megatron-LM keeps a
    list (several types), a plain value for one, and read back the same way."""
    from megatron_wsm.checkpoint import megatron_lm

    layout = {"tensor_model_parallel_size": 1, "data_parallel_size": 1, "world_size": 1}
    for flags, types, coeffs in [
        (TWO_TYPES, ["aux_loss", "seq_aux_loss"], [1e-2, 1e-3]),
        ([], "aux_loss", 1e-2),
    ]:
        cfg = _validated(*flags)
        args = megatron_lm_args(
            cfg.to_json(), iteration=1, consumed_samples=4, padded_vocab_size=512, parallel=layout
        )
        assert isinstance(args, argparse.Namespace)
        assert args.moe_router_load_balancing_type == types
        assert args.moe_aux_loss_coeff == coeffs
        back = megatron_lm.run_config_from_args(args).model
        assert back.moe_router_load_balancing_type == types
        assert back.moe_aux_loss_coeff == coeffs


# ------------------------------------------------------------- forward/backward on CPU


def _forward_backward(*flags: str) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """One forward/backward of the tiny MoE (fixed weights and tokens): megatron-core's
    per-layer aux-loss tracker afterwards, and the routers' weight gradients."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )

    from megatron_wsm.model import FusionKernels, build_gpt_model, build_transformer_config

    cfg = _validated(*flags, "--layout-independent-init")
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(1)
    model = build_gpt_model(
        build_transformer_config(cfg.model, cfg.parallel, FusionKernels()), cfg.model, 512
    )
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 512, (2, 32), generator=gen)
    position_ids = torch.arange(32).expand(2, 32)
    clear_aux_losses_tracker()
    loss = model(tokens, position_ids, attention_mask=None, labels=tokens.roll(-1, 1))
    loss.float().mean().backward()
    tracker = {
        name: entry["values"].detach().clone()
        for name, entry in get_moe_layer_wise_logging_tracker().items()
        if entry["values"].abs().sum() > 0
    }
    clear_aux_losses_tracker()
    grads = [layer.mlp.router.weight.grad.clone() for layer in model.decoder.layers]
    return tracker, grads


def test_two_types_log_and_train_both_aux_losses(megatron_world):
    tracker, grads = _forward_backward(*TWO_TYPES)
    # megatron-core's tracker names: aux_loss -> load_balancing_loss, seq_aux_loss ->
    # seq_load_balancing_loss; each the loss / its coefficient, per layer (2 MoE layers here)
    assert set(tracker) == {"load_balancing_loss", "seq_load_balancing_loss"}
    for values in tracker.values():
        assert values.shape == (2,)
        # a load-balancing loss normalised by its coefficient is ~1 for a near-even router
        assert all(0.5 < float(v) < 2.0 and math.isfinite(float(v)) for v in values)
    # both losses reach the routers' gradients with their own coefficients: the gradient is
    # the one without aux losses plus 1e-2 × d(aux) + 1e-3 × d(seq_aux)
    _, plain = _forward_backward(
        "--moe-router-load-balancing-type", "none", "--moe-aux-loss-coeff", "0"
    )
    _, aux = _forward_backward("--moe-router-load-balancing-type", "aux_loss")
    seq_tracker, seq = _forward_backward(
        "--moe-router-load-balancing-type", "seq_aux_loss", "--moe-aux-loss-coeff", "1e-3"
    )
    assert set(seq_tracker) == {"seq_load_balancing_loss"}
    torch.testing.assert_close(seq_tracker["seq_load_balancing_loss"],
                               tracker["seq_load_balancing_loss"])  # fmt: skip
    for both, none, a, s in zip(grads, plain, aux, seq, strict=True):
        assert not torch.allclose(both, a) and not torch.allclose(both, s)
        torch.testing.assert_close(both - none, (a - none) + (s - none), rtol=1e-4, atol=1e-7)
