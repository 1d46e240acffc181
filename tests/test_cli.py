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


def test_out_collisions_resume_and_bad_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--iterations", "2", "--hidden", "4", "--particles", "2", "--num-tasks", "12",
            "--eval-tasks", "3", "--out", str(out), "--no-progress"]
    assert main(base) == 0
    capsys.readouterr()
    assert main(base) == 2  # a run is there: neither resumed nor replaced silently
    assert "already holds a run" in capsys.readouterr().err
    assert main(base[:2] + ["3"] + base[3:] + ["--resume", "--seed", "1"]) == 2
    assert "seed: 0 (saved) != 1 (now)" in capsys.readouterr().err
    assert main(base[:2] + ["3"] + base[3:] + ["--resume", "--lr", "0.01"]) == 2
    assert "lr: 0.001 (saved) != 0.01 (now)" in capsys.readouterr().err
    assert main(base[:2] + ["3"] + base[3:] + ["--resume"]) == 0
    assert main(base + ["--overwrite"]) == 0
    capsys.readouterr()
    # evaluate keeps the training report unless told otherwise
    assert main(["evaluate", str(out / "checkpoint.pt"), "--eval-tasks", "3"]) == 2
    assert "already holds a report" in capsys.readouterr().err
    assert main(["evaluate", str(out / "checkpoint.pt"), "--eval-tasks", "3", "--overwrite"]) == 0
    capsys.readouterr()
    # unreadable checkpoints: one clear message naming the path, no traceback, no advice to
    # load with weights_only=False
    bad = tmp_path / "bad.pt"
    for content in (b"\x00garbage" * 50, (out / "checkpoint.pt").read_bytes()[:300]):
        bad.write_bytes(content)
        assert main(["evaluate", str(bad), "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert f"not a valid pyro_bmaml checkpoint: {bad}" in err
        assert "Traceback" not in err and "weights_only=False" not in err
    import torch

    torch.save({"model": torch.zeros(2)}, bad)
    assert main(["evaluate", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "expected the entries" in capsys.readouterr().err


def test_a_learned_predictive_temperature_reaches_the_checkpoint_and_back(tmp_path, capsys):
    """``--learn-predictive-temperature``: the learner meta-learns it, the checkpoint's
    config records it, and a learner loaded from the checkpoint adapts with it."""
    pytest.importorskip("sklearn")
    from pyro_bmaml.cli import load_learner

    out = tmp_path / "digits"
    assert main(["train", "--task", "digits-5way-1shot", "--iterations", "3", "--particles", "2",
                 "--hidden", "8", "--eval-tasks", "4", "--meta-batch", "2", "--out", str(out),
                 "--no-progress", "--learn-predictive-temperature"]) == 0
    learner, state = load_learner(out / "checkpoint.pt")
    assert learner.learn_predictive_temperature
    assert state["extra"]["config"]["learn_predictive_temperature"] is True
    t = learner.predictive_temperature
    assert t != 1.0 and learner.describe()["predictive_temperature"] == t
    assert main(["evaluate", str(out / "checkpoint.pt"), "--eval-tasks", "4",
                 "--out", str(tmp_path / "again")]) == 0
    assert "test accuracy" in capsys.readouterr().out


def test_a_learned_prior_reaches_the_checkpoint_and_back(tmp_path, capsys):
    """``--learn-prior full`` on a family of the suite: the learner adapts under its learned
    Gaussian prior, the checkpoint's config records it, and a learner loaded from it has
    the same prior."""
    import torch

    from pyro_bmaml.cli import load_learner

    out = tmp_path / "ng"
    assert main(["train", "--task", "normal-gamma", "--iterations", "3", "--particles", "3",
                 "--eval-tasks", "4", "--meta-batch", "2", "--out", str(out), "--no-progress",
                 "--learn-prior", "full"]) == 0
    learner, state = load_learner(out / "checkpoint.pt")
    assert learner.learn_prior == "full" and state["extra"]["config"]["learn_prior"] == "full"
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["learner"]
    assert torch.equal(learner.learned_prior.tril, saved["learned_prior.tril"])
    assert main(["train", "--task", "normal-gamma", "--method", "emaml", "--learn-prior",
                 "diagonal", "--out", str(tmp_path / "e")]) == 2
    assert "objective='log_joint'" in capsys.readouterr().err


def test_load_learner_from_a_cli_checkpoint(tmp_path):
    import torch

    from pyro_bmaml.cli import load_learner

    out = tmp_path / "run"
    assert main(["train", "--iterations", "2", "--hidden", "4", "--particles", "2",
                 "--num-tasks", "12", "--eval-tasks", "3", "--out", str(out), "--no-progress"]) == 0
    learner, state = load_learner(out / "checkpoint.pt")
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["learner"]
    assert torch.equal(learner.theta0, saved["theta0"]) and state["iteration"] == 2
    post = learner.adapt(torch.linspace(-3, 3, 5)[:, None], torch.zeros(5))
    assert post.particles.shape == learner.theta0.shape


@pytest.mark.parametrize("script,args", [
    ("sinusoid_regression.py", ["--iterations", "2", "--seeds", "0", "--shots", "5",
                                "--num-tasks", "100", "--methods", "maml", "--eval-tasks", "5"]),
    ("fewshot_classification.py", ["--iterations", "2", "--seeds", "0", "--shots", "1",
                                   "--methods", "maml", "--test-episodes", "5",
                                   "--val-episodes", "3"]),
    ("meta_rl_point.py", ["--iterations", "2", "--seeds", "0", "--methods", "maml",
                          "--eval-tasks", "3", "--test-tasks", "3", "--episodes", "2"]),
])
def test_examples_write_to_a_scratch_folder_by_default(tmp_path, script, args):
    """A trial run of a reproduction script never touches the committed results/."""
    import subprocess
    import sys
    from pathlib import Path

    if script.startswith("fewshot"):
        pytest.importorskip("sklearn")
    if script.startswith("meta_rl"):
        pytest.importorskip("gymnasium")
    path = Path(__file__).resolve().parents[1] / "examples" / script
    done = subprocess.run([sys.executable, str(path), *args, "--workers", "1"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / "results").exists()
    written = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert any(name.endswith(".md") for name in written) and any(
        name.endswith(".runs.jsonl") for name in written)
    if not script.startswith("meta_rl"):  # scored at n and at the count fit chose
        report = next((tmp_path / "runs").glob("*.md")).read_text()
        assert "chosen steps" in report and "| - | - |" not in report


def test_torchrun_two_processes_equal_one(tmp_path, capsys):
    """`torchrun --standalone --nproc_per_node=2 -m pyro_bmaml train ...` (gloo on the CPU)
    writes the checkpoint a single process writes with the same meta-batch (float32 sums in
    another order: 1e-5)."""
    import subprocess
    import sys

    import torch

    argv = ["train", "--iterations", "6", "--particles", "3", "--hidden", "10,10",
            "--eval-tasks", "5", "--no-progress", "--meta-batch", "4"]
    assert main(argv + ["--out", str(tmp_path / "one")]) == 0
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "-m", "pyro_bmaml"] + argv
                          + ["--out", str(tmp_path / "two")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "meta-trained on 2 processes (2 tasks each per meta-batch)" in done.stdout
    one, two = (torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)
                for run in ("one", "two"))
    torch.testing.assert_close(two["learner"]["theta0"], one["learner"]["theta0"],
                               rtol=1e-5, atol=1e-6)
    assert (tmp_path / "two" / "evaluation" / "metrics.json").is_file()


FAMILY_MODULE = '''
import pyro, pyro.distributions as dist, torch
from pyro_bmaml.tasks.base import TaskBatch
from pyro_bmaml.tasks.registry import TaskFamily, register_family


def model(x, y=None):
    slope = pyro.sample("slope", dist.Normal(0.0, 2.0))
    tau = pyro.sample("tau", dist.Gamma(2.0, 0.5))
    mean = slope * x[:, 0]
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(mean, tau.rsqrt()), obs=y)
    return mean


class Lines:
    def draw(self, t, g):
        x = torch.rand(t, 8, 1, generator=g) * 4 - 2
        y = (1 + 0.3 * torch.randn(t, 1, generator=g)) * x[..., 0] + 0.2 * torch.randn(t, 8, generator=g)
        return TaskBatch(x[:, :3], y[:, :3], x[:, 3:], y[:, 3:])

    def sample(self, batch_size, generator):
        return self.draw(batch_size, generator)

    def evaluation_tasks(self, num_tasks=100, seed=12345):
        return self.draw(num_tasks, torch.Generator().manual_seed(seed))


class LineFamily(TaskFamily):
    name = "my-lines"
    eval_tasks = 20

    def model(self, config):
        return model

    def sources(self, config, learner=None):
        return Lines(), Lines(), None


register_family(LineFamily())
'''


def test_a_family_defined_outside_the_package_trains_and_evaluates(tmp_path, monkeypatch, capsys):
    """The registry as a user meets it: a module of their own registers a family, the CLI
    imports it (``--import``), trains on it with the learners' defaults, and ``evaluate``
    finds it again from the checkpoint's recorded configuration."""
    (tmp_path / "my_lines_family.py").write_text(FAMILY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    assert main(["train", "--import", "my_lines_family", "--task", "my-lines", "--iterations",
                 "5", "--particles", "4", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "test mse" in printed and "before meta-training" in printed
    assert main(["evaluate", str(out / "checkpoint.pt"), "--out", str(tmp_path / "ev")]) == 0
    assert "after 5 meta-iterations" in capsys.readouterr().out
    assert main(["train", "--task", "no-such-family", "--out", str(tmp_path / "x")]) == 2
    assert "unknown --task 'no-such-family'" in capsys.readouterr().err
    assert main(["train", "--import", "no_such_module_xyz", "--out", str(tmp_path / "y")]) == 2
    assert "--import no_such_module_xyz" in capsys.readouterr().err


def test_registry_refuses_a_taken_name():
    from pyro_bmaml.tasks.registry import TaskFamily, register_family, task_family

    with pytest.raises(ValueError, match="registered already"):
        register_family(TaskFamily.__new__(type("S", (TaskFamily,), {"name": "sinusoid"})))
    assert task_family("digits-5way-1shot").name == "classification"
    assert task_family("normal-gamma").name == "normal-gamma"
    with pytest.raises(TypeError, match="TaskFamily"):
        register_family(object())


def test_compile_reaches_the_learner():
    from pyro_bmaml.cli import build_learner

    config = {"task": "sinusoid", "method": "bmaml", "particles": 3, "hidden": [4],
              "leader_steps": 1,
              "compile": True}
    assert build_learner(config).compile is True
    assert build_learner({**config, "compile": None}).compile is False


def test_bmaml_only_options_are_refused_for_the_baselines(tmp_path, capsys):
    for flag in (["--chaser-trains-noise"], ["--step-size-objective", "query_nll"],
                 ["--compile"]):
        assert main(["train", "--method", "emaml", *flag, "--out", str(tmp_path / "r")]) == 2
        assert "is a bmaml option" in capsys.readouterr().err
    assert main(["train", "--max-kl", "0.1", "--out", str(tmp_path / "r")]) == 2
    assert "--max-kl is a --meta-optimizer trpo option" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a torch without CUDA")
def test_a_device_this_torch_lacks_is_one_clear_error(tmp_path, capsys):
    """``--device cuda`` on a CPU-only torch: one line naming the device and what to use,
    not torch's assertion; a malformed device likewise."""
    assert main(["train", "--device", "cuda", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: this torch build has no usable CUDA" in err and "Traceback" not in err
    assert main(["train", "--device", "gpu0", "--out", str(tmp_path / "s")]) == 2
    assert "is not a device" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing.pt"), "--device", "cuda:0"]) == 2
    assert "no usable CUDA" in capsys.readouterr().err
