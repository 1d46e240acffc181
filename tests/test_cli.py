"""The command line: a tiny train + evaluate round trip, and clear errors."""

import json

import pytest

from pyro_bmaml.cli import main


def test_train_then_evaluate(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--iterations", "3", "--hidden", "8", "--particles", "3",
                 "--num-tasks", "12", "--eval-tasks", "5", "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "test MSE" in printed and "test NLL" in printed
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert metrics["mse"][0] > 0 and set(metrics["coverage"]) == {"0.5", "0.8", "0.9", "0.95"}
    report = tmp_path / "report"
    assert main(["evaluate", str(out / "checkpoint.pt"), "--eval-tasks", "5",
                 "--out", str(report)]) == 0
    assert "after 3 meta-iterations" in capsys.readouterr().out
    for name in ("metrics.md", "metrics.json", "predictive.png", "ksd.png", "calibration.png",
                 "training.png"):
        assert (report / name).stat().st_size > 1000 or name.startswith("metrics"), name
        assert (report / name).stat().st_size > 0


@pytest.mark.parametrize("argv", [
    ["train", "--bogus"], ["train", "--particles", "0"], ["train", "--hidden", "4,x"],
    ["train", "--method", "vi"], ["fly"],
])
def test_bad_arguments_exit_2(argv):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2


def test_bad_values_are_reported(tmp_path, capsys):
    assert main(["train", "--particles", "1", "--out", str(tmp_path)]) == 2
    assert "--particles must be >= 2" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["train", "--task", "bogus", "--out", str(tmp_path)]) == 2
    assert "unknown --task 'bogus'" in capsys.readouterr().err
    assert main(["train", "--task", "digits-5way-1shot", "--shots", "5", "--out", str(tmp_path)]) == 2
    assert "contradicts" in capsys.readouterr().err


def test_classification_family_train_then_evaluate(tmp_path, capsys):
    """Adding a task family is a CLI registry entry: digits episodes, the classifier, the
    classification metrics and reliability diagram come through the same train/evaluate."""
    pytest.importorskip("sklearn")
    out = tmp_path / "digits"
    assert main(["train", "--task", "digits-5way-1shot", "--iterations", "2", "--particles", "2",
                 "--hidden", "8", "--eval-tasks", "6", "--meta-batch", "2", "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "ECE" in printed
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert 0 <= metrics["accuracy"][0] <= 1 and len(metrics["reliability"]["count"]) == 15
    assert (out / "evaluation" / "calibration.png").stat().st_size > 1000
    assert main(["evaluate", str(out / "checkpoint.pt"), "--eval-tasks", "4",
                 "--out", str(tmp_path / "again")]) == 0
    assert "test accuracy" in capsys.readouterr().out
