"""examples/branch_csv.py: a branched run's log joined onto its parent's reads as one run."""

from __future__ import annotations

import importlib.util

from megatron_wsm.annealing.logs import load_run
from tests.helpers import ROOT


def test_branch_joins_parent_and_loads_as_one_run(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from megatron_wsm import metric_names as names

    for name, steps, lr in (("parent", range(1, 11), 1.0), ("branch", range(7, 11), 0.5)):
        writer = SummaryWriter(str(tmp_path / name))
        for s in steps:
            writer.add_scalar(names.LEARNING_RATE, lr, s)
            writer.add_scalar(names.LM_LOSS, 10.0 - s * lr, s)
        writer.close()
    spec = importlib.util.spec_from_file_location("branch_csv", ROOT / "examples" / "branch_csv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "joined.csv"
    assert module.main([str(tmp_path / "parent"), str(tmp_path / "branch"), "6", str(out)]) == 0
    run = load_run(str(out))
    assert list(run.lrs) == [1.0] * 6 + [0.5] * 4
    assert list(run.steps) == list(range(1, 11))
    assert list(run.loss[5:7]) == [4.0, 6.5]  # parent's step 6, then the branch's step 7
