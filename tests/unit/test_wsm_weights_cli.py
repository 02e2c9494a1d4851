"""Tests of the wsm_weights CLI (tools/wsm_weights.py -> megatron_wsm.cli.wsm_weights)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

# The CLI draws on an Agg canvas directly (no pyplot), so no backend needs choosing here.
from megatron_wsm.cli.wsm_weights import main
from megatron_wsm.coefficients import MAIN_METHODS, decay_weights, merge_coefficients

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "wsm_weights.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_tool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Run the tool as a user would: a fresh interpreter, the package not installed."""
    env = dict(os.environ, MPLBACKEND="Agg")
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [sys.executable, str(TOOL), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def assert_valid_png(path: Path, min_bytes: int = 10_000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > min_bytes, f"{path} is only {len(data)} bytes"
    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.shape[2] in (3, 4)


def test_table_for_one_method(tmp_path: Path) -> None:
    # cwd outside the repo: the wrapper must find the package by itself.
    proc = run_tool("--method", "1-sqrt", "--k", "8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "1-sqrt" in out and "f(t) = 1 - sqrt(t)" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] != []]
    rows = [r for r in rows if r[0].isdigit()]
    assert [int(r[0]) for r in rows] == list(range(9))
    c = [float(r[2]) for r in rows]
    assert c == pytest.approx(merge_coefficients("1-sqrt", 8), abs=1e-8)
    assert "sum c = 1.000000000000" in out


def test_json_several_methods_with_params() -> None:
    proc = run_tool(
        "--method", "1-sqrt", "ema", "exponential", "--k", "5",
        "--alpha", "0.3", "--final-ratio", "0.05", "--min-lr-ratio", "0.1", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["k"] == 5
    assert [m["method"] for m in doc["methods"]] == ["1-sqrt", "ema", "exponential"]
    by_name = {m["method"]: m for m in doc["methods"]}
    assert by_name["ema"]["params"] == {"min_lr_ratio": 0.1, "alpha": 0.3}
    assert by_name["exponential"]["params"]["final_ratio"] == 0.05
    # JSON keeps float64 exactly: the numbers are the library's, bit for bit.
    assert by_name["ema"]["coefficients"] == merge_coefficients(
        "ema", 5, alpha=0.3, min_lr_ratio=0.1
    )
    assert by_name["1-sqrt"]["decay"] == decay_weights("1-sqrt", 5, min_lr_ratio=0.1)


def test_plot_one_and_several_methods(tmp_path: Path) -> None:
    single = tmp_path / "single.png"
    proc = run_tool("--method", "cosine", "--k", "4", "--plot", str(single), "--json")
    assert proc.returncode == 0, proc.stderr
    json.loads(proc.stdout)  # the plot notice goes to stderr, stdout stays JSON
    assert_valid_png(single)

    several = tmp_path / "several.png"
    argv = ["--k", "8", "--method", *MAIN_METHODS[:3], "--plot", str(several), "--dpi", "60"]
    assert main(argv) == 0
    assert_valid_png(several)


def test_custom_coefficients_and_decay(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--coefficients", "0,0.25,0.25,0.5", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["k"] == 3
    assert doc["methods"][0]["decay"] == [1.0, 0.75, 0.5]

    path = tmp_path / "decay.txt"
    path.write_text("1.0\n0.5\n0.25\n")
    assert main(["--decay", str(path), "--method", "linear", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [m["method"] for m in doc["methods"]] == ["linear", "custom"]
    assert doc["methods"][1]["coefficients"] == [0.0, 0.5, 0.25, 0.25]
    assert len(doc["methods"][0]["coefficients"]) == 4  # named methods follow the custom k


def test_all_methods_table(capsys: pytest.CaptureFixture) -> None:
    assert main(["--all", "--k", "3"]) == 0
    out = capsys.readouterr().out
    for name in ("linear", "wsd-exponential", "constant", "mean", "ema"):
        assert f"{name}: " in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "1-sqrt"], "--k is required"),
        (["--method", "linear", "--k", "0"], "k .* must be >= 1"),
        (["--method", "ema", "--k", "4", "--alpha", "1.5"], r"alpha must be in \(0, 1\]"),
        (["--decay", "0.5,0.9"], "rises"),
        (["--decay", "1.3,0.5"], r"outside \[0, 1\]"),
        (["--weights", "0.5,0.6"], "must sum to 1"),
        (["--weights", "0.5,nan"], "NaN"),
        (["--weights", "0,0.5,0.5", "--k", "3"], "k = 3 does not match"),
        (["--weights", "no/such/file.json"], "neither an existing file"),
        (["--method", "linear", "--k", "4", "--min-lr-ratio", "2"], "min_lr_ratio must be"),
    ],
)
def test_bad_values_exit_2_with_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("wsm_weights: error: ")
    assert re.search(message, err), err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "nope", "--k", "4"], "invalid choice: 'nope'"),
        (["--k", "4"], "choose --method"),
        (["--method", "custom"], "needs --weights or --decay"),
        (["--method", "linear", "--k", "4", "--alpha", "0.5"], "--alpha only applies"),
        (["--method", "mean", "--k", "4", "--final-ratio", "0.5"], "--final-ratio only"),
        (["--coefficients", "0,1", "--decay", "1"], "not allowed with"),
    ],
)
def test_usage_errors_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_unwritable_plot_path_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    target = tmp_path / "missing_dir" / "x.png"
    assert main(["--method", "mean", "--k", "2", "--plot", str(target)]) == 1
    captured = capsys.readouterr()
    assert "cannot write plot" in captured.err
    assert captured.out == ""  # refused before printing anything
    assert not target.exists()


def test_unknown_method_from_subprocess() -> None:
    proc = run_tool("--method", "bogus", "--k", "4")
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr


def test_committed_figure_is_valid() -> None:
    assert_valid_png(REPO / "docs" / "wsm_weights_k8.png", min_bytes=30_000)


# --------------------------------------------------------------------------- conventions, positions


def test_convention_megatron_lm_in_process(capsys) -> None:
    assert (
        main(["--method", "1-sqrt", "mean", "--k", "3", "--convention", "megatron-lm", "--json"])
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert doc["convention"] == "megatron-lm"
    assert "f(i/(k+1))" in doc["discretisation"]
    by_method = {m["method"]: m for m in doc["methods"]}
    assert [round(x, 3) for x in by_method["1-sqrt"]["coefficients"]] == [0.5, 0.207, 0.159, 0.134]
    assert by_method["mean"]["coefficients"] == [0.25] * 4
    assert by_method["mean"]["zero_weight_inputs"] == []


def test_default_convention_reports_the_anchor(capsys) -> None:
    assert main(["--method", "1-sqrt", "--k", "3", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["convention"] == "wsm" and doc["positions"] is None
    (m,) = doc["methods"]
    assert m["coefficients"] == merge_coefficients("1-sqrt", 3)
    assert m["zero_weight_inputs"] == [0]
    assert any("oldest" in n for n in m["notes"])


def test_positions_uneven_window(capsys) -> None:
    assert main(["--method", "linear", "--positions", "0,100,300,400"]) == 0
    out = capsys.readouterr().out
    rows = [
        line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0].isdigit()
    ]
    assert [r[1] for r in rows] == ["n@0", "n+1@100", "n+2@300", "n+3@400"]
    assert [float(r[2]) for r in rows] == pytest.approx([0.0, 0.25, 0.5, 0.25], abs=1e-8)
    # LR area weights the intervals by length: (1*1 + 0.75*2 + 0.25*1) / 4.
    assert "mean w (LR area of the window) = 0.687500" in out
    assert "t_(i-1)" in out


def test_positions_errors(capsys) -> None:
    assert main(["--method", "linear", "--positions", "0,100,300", "--k", "3"]) == 2
    assert "--positions gives 3 checkpoints but k = 3" in capsys.readouterr().err
    assert main(["--method", "linear", "--positions", "0,100,100"]) == 2
    assert "increase strictly" in capsys.readouterr().err
    assert main(["--method", "linear", "--positions", "0,1,3", "--convention", "megatron-lm"]) == 2
    assert "need convention 'wsm'" in capsys.readouterr().err
    assert main(["--method", "linear", "--positions", "0,x"]) == 2
    assert "not a number: 'x'" in capsys.readouterr().err


def test_positions_plot(tmp_path: Path) -> None:
    out = tmp_path / "uneven.png"
    assert (
        main(
            [
                "--method",
                "1-sqrt",
                "--positions",
                "0,1,2,5,6",
                "--sampling",
                "mean",
                "--plot",
                str(out),
            ]
        )
        == 0
    )
    assert_valid_png(out)
