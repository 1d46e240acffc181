"""Few-shot classification: episodes, image folders, the classifier model, calibration
metrics, a short training run on unseen classes, and the task-family-agnostic meta layer."""

import math

import pyro
import pytest
import torch

from pyro_bmaml import BMAML, EMAML, MAML, RBFSteinKernel, TaskBatch
from pyro_bmaml.tasks.fewshot import FewShotClassification, load_image_folder
from pyro_bmaml.evaluation.metrics import calibration_errors, classification_metrics
from pyro_bmaml.tasks.models import BayesianClassifier, BayesianMLP
from pyro_bmaml.meta.training import evaluate

pytest.importorskip("sklearn")


def toy_classes(num_classes=12, per_class=6, shape=(1, 4, 4)):
    """Class c's images are constant c (so an image tells its class)."""
    return [torch.full((per_class, *shape), float(c)) + 0.01 * torch.randn(per_class, *shape)
            for c in range(num_classes)]


def test_episodes_shapes_labels_and_disjoint_splits():
    src = FewShotClassification(toy_classes(), ways=3, shots=2, query=3, seed=1,
                                fractions=(0.5, 0.25, 0.25))
    splits = [set(src.splits[s]) for s in ("train", "val", "test")]
    assert sum(len(s) for s in splits) == 12 and not (splits[0] & splits[1] | splits[0] & splits[2]
                                                      | splits[1] & splits[2])
    g = torch.Generator().manual_seed(0)
    batch = src.sample(50, g)
    assert batch.x_support.shape == (50, 6, 1, 4, 4) and batch.y_support.shape == (50, 6)
    assert batch.x_query.shape == (50, 9, 1, 4, 4) and batch.y_query.dtype == torch.long
    # every episode: labels 0..N-1, K support and Q query points each
    for t in range(50):
        assert torch.equal(torch.bincount(batch.y_support[t], minlength=3), torch.full((3,), 2))
        assert torch.equal(torch.bincount(batch.y_query[t], minlength=3), torch.full((3,), 3))
    # the class behind each label (its constant value) comes from the split and is the same in
    # support and query; labels are permuted across episodes
    cls = batch.x_support.mean((-1, -2, -3)).round().long()  # (T, N*K)
    cls_q = batch.x_query.mean((-1, -2, -3)).round().long()
    owners = set()
    for t in range(50):
        for label in range(3):
            (c,) = set(cls[t][batch.y_support[t] == label].tolist())
            assert set(cls_q[t][batch.y_query[t] == label].tolist()) == {c}
            assert c in splits[0]
            owners.add((label, c))
    assert len({c for label, c in owners if label == 0}) > 1  # no class owns label 0
    for split, members in (("val", splits[1]), ("test", splits[2])):
        held = src.evaluation_tasks(20, split=split)
        assert set(held.x_support.mean((-1, -2, -3)).round().long().flatten().tolist()) <= members
    # support and query images of a class are distinct draws (no image in both)
    one = src.episodes(1, torch.Generator().manual_seed(3))
    flat_s, flat_q = one.x_support[0].flatten(1), one.x_query[0].flatten(1)
    assert not any(torch.equal(a, b) for a in flat_s for b in flat_q)


def test_episode_errors_are_clear():
    with pytest.raises(ValueError, match="fewer than ways=5"):
        FewShotClassification(toy_classes(), ways=5, shots=1, query=1)
    with pytest.raises(ValueError, match="shots \\+ query = 8 images per class"):
        FewShotClassification(toy_classes(), ways=2, shots=4, query=4)
    with pytest.raises(ValueError, match="splits must be disjoint"):
        FewShotClassification(toy_classes(), ways=2,
                              splits={"train": [0, 1, 2], "val": [2, 3], "test": [4, 5]})
    with pytest.raises(ValueError, match="every image must have one shape"):
        FewShotClassification([torch.zeros(5, 1, 4, 4), torch.zeros(5, 1, 5, 5)] * 6, ways=2)
    with pytest.raises(ValueError, match="ways must be >= 2"):
        FewShotClassification(toy_classes(), ways=1)


def test_digits_rotations_are_distinct_classes_split_by_digit():
    src = FewShotClassification.digits(ways=5, shots=1, query=15)
    assert src.num_classes == 40 and src.input_shape == (1, 8, 8)
    assert {k: len(v) for k, v in src.splits.items()} == {"train": 24, "val": 8, "test": 8}
    digit = [int(n.split()[1]) for n in src.names]
    for split in ("train", "val", "test"):  # all four rotations of a digit share a split
        digits = {digit[c] for c in src.splits[split]}
        assert sorted(c for c in range(40) if digit[c] in digits) == src.splits[split]
    # a rotated class is a different class: its images differ from the unrotated ones
    same_digit = [c for c in range(40) if digit[c] == 3]
    images = [src.classes[c] for c in same_digit]
    for a in range(4):
        for b in range(a + 1, 4):
            assert (images[a] - images[b]).abs().mean() > 0.05
    assert torch.equal(torch.rot90(images[0], 1, dims=(-2, -1)), images[1])
    assert 0.0 <= float(src.classes[0].min()) and float(src.classes[0].max()) <= 1.0


def test_image_folder_loader(tmp_path):
    from PIL import Image

    def write(folder, value, n=4, size=(10, 12)):
        folder.mkdir(parents=True)
        for i in range(n):
            Image.new("L", size, color=value + i).save(folder / f"{i}.png")

    root = tmp_path / "omniglot"
    for a, alphabet in enumerate(("Latin", "Greek")):
        for c in range(3):
            write(root / alphabet / f"character{c}", 40 * (3 * a + c))
    (root / "README.txt").write_text("not an image")
    classes, names, splits = load_image_folder(root, image_size=(6, 5))
    assert names[0] == "Greek/character0" and len(names) == 6 and splits is None
    assert classes[0].shape == (4, 1, 6, 5)
    # value 40 * 3 + i in [0, 255] -> scaled to [0, 1] (bilinear resize of a constant image)
    assert torch.allclose(classes[0][1], torch.full((1, 6, 5), 121 / 255), atol=1e-6)
    cache = list((root / ".pyro_bmaml_cache").glob("*.pt"))
    assert len(cache) == 1
    again, _, _ = load_image_folder(root, image_size=(6, 5))  # from the cache
    assert all(torch.equal(a, b) for a, b in zip(classes, again))
    src = FewShotClassification.from_folder(root, ways=2, shots=1, query=3, image_size=(6, 5),
                                            fractions=(0.34, 0.33, 0.33))
    assert src.sample(2, torch.Generator()).x_support.shape == (2, 2, 1, 6, 5)

    mini = tmp_path / "mini"
    for split, offset in (("train", 0), ("val", 100), ("test", 200)):
        for c in range(2):
            write(mini / split / f"n{offset + c}", offset + 10 * c)
    _, names, splits = load_image_folder(mini, image_size=(4, 4), channels=3, cache=False)
    assert [names[i] for i in splits["test"]] == ["test/n200", "test/n201"]
    src = FewShotClassification.from_folder(mini, ways=2, shots=1, query=2, image_size=(4, 4),
                                            channels=3, cache=False)
    assert src.evaluation_tasks(3).x_query.shape == (3, 4, 3, 4, 4)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        load_image_folder(tmp_path / "empty")


def test_calibration_errors_closed_values():
    # two bins used: confidence 0.85 (4 points, 3 right) and 0.35 (1 point, right)
    conf = torch.tensor([0.85, 0.85, 0.85, 0.85, 0.35], dtype=torch.float64)
    correct = torch.tensor([1, 1, 1, 0, 1.0])
    ece, mce, bins = calibration_errors(conf, correct, num_bins=10)
    assert ece == pytest.approx(4 / 5 * abs(0.75 - 0.85) + 1 / 5 * abs(1 - 0.35))
    assert mce == pytest.approx(0.65)
    assert bins["count"].sum() == 5 and int(bins["count"][8]) == 4 and int(bins["count"][3]) == 1
    assert bool(bins["accuracy"][0].isnan())  # an empty bin
    perfect = calibration_errors(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0]))
    assert perfect[:2] == (0.0, 0.0)


def test_calibration_errors_equal_torchmetrics():
    tm = pytest.importorskip("torchmetrics.functional.classification")
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(500, 5, generator=g), -1)
    target = torch.randint(0, 5, (500,), generator=g)
    conf, pred = probs.max(-1)
    ece, mce, _ = calibration_errors(conf, (pred == target).float(), num_bins=15)
    assert ece == pytest.approx(float(tm.multiclass_calibration_error(
        probs, target, num_classes=5, n_bins=15, norm="l1")), abs=1e-6)
    assert mce == pytest.approx(float(tm.multiclass_calibration_error(
        probs, target, num_classes=5, n_bins=15, norm="max")), abs=1e-6)


@pytest.mark.parametrize("network,shape", [("mlp", (1, 4, 4)), ("conv4", (1, 8, 8))])
def test_shared_features_get_meta_gradients(network, shape):
    pyro.set_rng_seed(0)
    model = BayesianClassifier(3, shape, network=network, hidden=(8,) if network == "mlp" else 4,
                               shared="features")
    learner = BMAML(model, num_particles=3, init="paper", step_size=0.1)
    assert learner.potential.site_names == ["head.weight", "head.bias"]  # particles: head only
    assert learner.theta0.shape == (3, model.feature_size * 3 + 3)
    x = torch.rand(2, 6, *shape)
    y = torch.arange(3).repeat(2, 2)
    batch = TaskBatch(x[:, :3], y[:, :3], x[:, 3:], y[:, 3:])
    learner.meta_loss(batch).backward()
    assert learner.theta0.grad.abs().sum() > 0
    shared = learner.shared_parameters
    assert shared and all(p.grad is not None and p.grad.abs().sum() > 0 for p in shared[:2])
    # the shared parameters are stepped by fit's optimizer and saved with the learner
    assert any(p is shared[0] for g in learner.optimizer_groups(1e-3) for p in g["params"])
    assert any(k.startswith("model.features") for k in learner.state_dict())


def _shared_setup(method=BMAML, **kwargs):
    torch.manual_seed(0)
    model = BayesianClassifier(3, (1, 4, 4), hidden=(6,), shared="features").double()
    extra = {"num_particles": 3} if method is not MAML else {}
    example = (torch.zeros(2, 1, 4, 4, dtype=torch.float64), torch.zeros(2, dtype=torch.long))
    learner = method(model, init="paper", step_size=0.3, shared_step_size=0.2,
                     example_args=example, **extra, **kwargs).double()
    x = torch.rand(2, 6, 1, 4, 4, dtype=torch.float64)
    y = torch.arange(3).repeat(2, 2)
    return model, learner, TaskBatch(x[:, :3], y[:, :3], x[:, 3:], y[:, 3:])


def test_shared_step_adapts_the_features_per_task():
    """One inner step: each task's features take a gradient step on the mean support NLL
    at the initial particles, and the particles take theirs with the initial features."""
    model, learner, batch = _shared_setup(inner_steps=1)
    theta = learner._expand(2).detach()
    adapted, shared = learner.adapt_state(theta, (batch.x_support, batch.y_support), 1)
    for t in range(2):
        phi = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
        loss = -learner.potential.with_parameters(phi).log_likelihood(
            theta[t], batch.x_support[t], batch.y_support[t]).mean()
        grads = torch.autograd.grad(loss, list(phi.values()))
        for (k, p), g in zip(phi.items(), grads):
            torch.testing.assert_close(shared[k][t], p - 0.2 * g)
    torch.testing.assert_close(adapted, learner.adapt_particles(
        theta, (batch.x_support, batch.y_support), 1))
    assert not torch.allclose(shared["features.0"][0], shared["features.0"][1])
    # the posterior predicts with its task's adapted features (batched == one task alone)
    post = learner.adapt(batch.x_support, batch.y_support)
    one = learner.adapt(batch.x_support[1], batch.y_support[1])
    torch.testing.assert_close(post.predict(batch.x_query)["mean"][1],
                               one.predict(batch.x_query[1])["mean"])
    torch.testing.assert_close(post.task(1).predict(batch.x_query[1])["mean"],
                               one.predict(batch.x_query[1])["mean"])
    frozen = type(learner)(model, num_particles=3, init=learner.theta0.detach(),
                           step_size=0.3, example_args=(batch.x_support[0], batch.y_support[0]))
    assert not torch.allclose(frozen.adapt(batch.x_support, batch.y_support)
                              .predict(batch.x_query)["mean"], post.predict(batch.x_query)["mean"])


@pytest.mark.parametrize("method", [BMAML, EMAML, MAML])
def test_meta_gradient_through_shared_adaptation_matches_finite_differences(method):
    """Two inner steps with the features adapted too: the meta-gradient with respect to a
    shared weight equals central differences of the meta-loss (float64, h = 1e-5: the
    truncation error is O(h^2) ~ 1e-10, far under the tolerance). BMAML with BFA and a
    bandwidth that is differentiated (no stop-gradient anywhere, so the meta-loss's full
    derivative is the gradient)."""
    extra = ({"objective": "bfa", "kernel": RBFSteinKernel(detach_bandwidth=False)}
             if method is BMAML else {})
    model, learner, batch = _shared_setup(method, inner_steps=2, calibration="none", **extra)
    learner.meta_loss(batch).backward()
    weight = model.features[0]
    for index in [(0, 0), (5, 3), (15, 2)]:
        with torch.no_grad():
            weight[index] += 1e-5
            up = float(learner.meta_loss(batch))
            weight[index] -= 2e-5
            down = float(learner.meta_loss(batch))
            weight[index] += 1e-5
        assert float(weight.grad[index]) == pytest.approx((up - down) / 2e-5, rel=1e-5, abs=1e-7)


def test_shared_step_needs_shared_parameters():
    with pytest.raises(ValueError, match="shared_step_size .* has none"):
        EMAML(BayesianClassifier(3, (1, 4, 4), hidden=(6,)), init="paper", shared_step_size=0.1)
    model, learner, batch = _shared_setup()
    with pytest.raises(ValueError, match=r"parameters\['features.0'\] must have shape"):
        learner.potential.with_parameters({"features.0": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="no parameter 'nope'"):
        learner.potential.with_parameters({"nope": torch.zeros(3)})


def test_classifier_posterior_metrics_and_inference_data():
    pyro.set_rng_seed(0)
    src = FewShotClassification(toy_classes(per_class=8), ways=3, shots=2, query=4,
                                fractions=(0.5, 0.25, 0.25))
    model = BayesianClassifier(3, (1, 4, 4), hidden=(8,))
    learner = EMAML(model, num_particles=4, init="paper", step_size=0.5)
    assert learner.objective == "nll" and learner.calibration == "none"
    tasks = src.evaluation_tasks(5)
    metrics = evaluate(learner, tasks, metrics=classification_metrics)
    probs = learner.adapt(tasks.x_support, tasks.y_support).predict(tasks.x_query)["mean"]
    accuracy = (probs.argmax(-1) == tasks.y_query).float().mean()
    assert metrics["accuracy"][0] == pytest.approx(float(accuracy))
    assert metrics["error_rate"][0] == pytest.approx(1 - float(accuracy))
    assert 0 <= metrics["ece"][0] <= 1 and metrics["mce"][0] >= metrics["ece"][0]
    assert metrics["accuracy_ci95"] == pytest.approx(1.96 * metrics["accuracy"][1])
    post = learner.adapt(tasks.x_support, tasks.y_support)
    idata = post.to_inference_data(tasks.x_query, tasks.y_query)
    assert idata.predictions["mean"].shape == (1, 4, 5, 12, 3)  # class probs per particle
    assert idata.constant_data["x"].dims == ("task", "support", "x_dim_0", "x_dim_1", "x_dim_2")
    assert idata.posterior["head.weight"].shape == (1, 4, 5, 8, 3)
    with pytest.raises(ValueError, match="integer labels"):
        classification_metrics(post, tasks.x_query, tasks.y_query.float())


def test_short_training_beats_chance_on_unseen_classes():
    """MAML, 5-way 1-shot digits, 150 meta-iterations: accuracy on 100 test episodes of
    digits never seen in training is far above chance (0.2; the s.e. over episodes of 75
    query points is about 0.015, so 0.3 is > 6 s.e. above chance)."""
    pyro.set_rng_seed(0)
    src = FewShotClassification.digits(ways=5, shots=1, query=15)
    learner = MAML(BayesianClassifier(5, (1, 8, 8), hidden=(32,)), init="paper", step_size=1.0)
    before = evaluate(learner, src.evaluation_tasks(100), metrics=classification_metrics)
    learner.fit(src, 150, meta_batch_size=5, lr=3e-3, progress=False)
    after = evaluate(learner, src.evaluation_tasks(100), metrics=classification_metrics)
    assert after["accuracy"][0] > 0.3
    assert after["accuracy"][0] > before["accuracy"][0] - 2 * before["accuracy"][1]
    assert after["nll"][0] < math.log(5)


def test_fit_chooses_the_step_count_on_the_validation_classes():
    """A few-shot source's training classes are fitted by the learned prior, so fit scores
    the step counts on episodes of its validation classes (``validation_tasks``): the
    selection's NLLs are those of select_adapt_steps on them, not on training episodes."""
    src = FewShotClassification(toy_classes(), ways=3, shots=1, query=2, seed=0,
                                fractions=(0.5, 0.25, 0.25))
    val = src.validation_tasks(1000, seed=4)
    labels = set(val.x_support.mean((-1, -2, -3)).round().long().flatten().tolist())
    assert labels <= set(src.splits["val"]) and val.num_tasks == 1000
    torch.testing.assert_close(val.x_query, src.evaluation_tasks(1000, seed=4, split="val").x_query)
    pyro.set_rng_seed(0)
    learner = BMAML(BayesianClassifier(3, (1, 4, 4), hidden=(8,)), num_particles=3,
                    init="paper", step_size=0.5, calibration="none")
    chosen = learner.fit(src, 3, meta_batch_size=4, progress=False, seed=3)["adapt_steps"]
    assert chosen["nll"] == pytest.approx(learner.select_adapt_steps(val)["nll"], rel=1e-6)
    train = src.sample(1000, torch.Generator().manual_seed(4))
    assert chosen["nll"] != pytest.approx(learner.select_adapt_steps(train)["nll"], rel=1e-3)


def test_multi_output_regression_and_image_shapes_pass_the_meta_layer():
    pyro.set_rng_seed(0)
    model = BayesianMLP(in_features=3, hidden=(8,), out_features=2)
    learner = BMAML(model, num_particles=3, init="paper", calibration="none")
    x, y = torch.randn(4, 6, 3), torch.randn(4, 6, 2)
    batch = TaskBatch(x[:, :4], y[:, :4], x[:, 4:], y[:, 4:])
    assert torch.isfinite(learner.meta_loss(batch))
    post = learner.adapt(x[0], y[0])
    assert post.predict(x[0])["mean"].shape == (6, 2)
    with pytest.raises(ValueError, match="target_shape=\\(2,\\)"):
        learner.adapt(x[0], y[0, :, 0])
    with pytest.raises(ValueError, match="y_query must have shape"):
        TaskBatch(x[:, :4], y[:, :4], x[:, 4:], y[:, :3]).validate()
