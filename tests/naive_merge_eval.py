"""Reference for merge tests: load every checkpoint whole, average in memory, evaluate.

    python tests/naive_merge_eval.py [pretrain flags] --coefficients c0,c1,.. --inputs A B ..

Prints one JSON line: {"loss": ...}. Deliberately the simple way (whole state dicts in RAM).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    argv = sys.argv[1:]
    i = argv.index("--inputs")
    inputs = argv[i + 1 :]
    argv = argv[:i]
    j = argv.index("--coefficients")
    coeffs = [float(x) for x in argv[j + 1].split(",")]
    argv = argv[:j] + argv[j + 2 :]

    import torch

    from megatron_wsm.arguments import parse_run_config
    from megatron_wsm.pretrain import setup
    from megatron_wsm.training import evaluate

    cfg, _ = parse_run_config([*argv, "--train-iters", "1"])
    comp, manager = setup(cfg)
    bare = manager.bare_model()
    total: dict[str, torch.Tensor] = {}
    for c, path in zip(coeffs, inputs):
        manager.load(path, load_optim=False, load_rng=False)
        for key, value in bare.state_dict().items():
            if torch.is_tensor(value) and value.is_floating_point():
                total[key] = total.get(key, 0) + c * value.double()
    state = bare.state_dict()
    for key, value in total.items():
        state[key] = value.to(state[key].dtype)
    bare.load_state_dict(state)
    result = evaluate(comp)
    print(json.dumps({"loss": result["loss"]}))


if __name__ == "__main__":
    main()
