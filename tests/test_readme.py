"""The README's python example runs as written."""

import re
from pathlib import Path


def test_readme_python_example_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    namespace = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    w_mean = namespace["svgd"].get_named_particles()["w"].mean(0)
    assert (w_mean - namespace["torch"].tensor([1.0, -2.0, 0.5])).abs().max() < 0.3
    assert namespace["theta0"].grad is not None
    # the user-task and few-shot blocks ran: a fitted line model and classification scores
    assert namespace["line"].noise_offset.abs().sum() > 0
    assert 0.0 <= namespace["scores"]["accuracy"][0] <= 1.0
    assert namespace["line_post"].particles.shape == (8, 2)
    assert callable(namespace["nuts_model"])
    # shared features adapted per task, and the meta-RL block
    assert namespace["adapted_body"].shared_step_size == 0.4
    assert 0.0 <= namespace["body_scores"]["accuracy"][0] <= 1.0
    assert namespace["returns"]["return"][0] < 0  # minus distances
    # the families block: references ordered, a gap share computed; the registry entry
    refs = namespace["refs"]
    assert refs["true"] < refs["broad"]
    assert isinstance(namespace["gap_closed"](refs["true"], refs["broad"], refs["true"]), float)
    from pyro_bmaml.tasks.registry import task_family
    assert task_family("noisy-lines").name == "noisy-lines"
