r"""Few-shot classification task sources: N-way K-shot episodes with disjoint class splits.

An *episode* (a task) draws N classes of one split, relabels them 0..N-1 in a random order
(a fresh label permutation per episode, so that no class owns a label), and draws K support
and Q query images of each class without replacement (Vinyals et al., 2016; Finn et al.,
2017). Meta-training episodes come from the ``"train"`` classes, model selection from
``"val"`` and the reported scores from ``"test"``: three disjoint sets of classes, so every
test episode asks about classes never seen in meta-training.

:class:`FewShotClassification` takes images grouped by class (any tensors of one shape)
and is the task source :meth:`~pyro_bmaml.meta.learners.MetaLearner.fit` needs; its ``metrics`` are
:func:`~pyro_bmaml.evaluation.metrics.classification_metrics`. Two ways to fill it:

- :meth:`FewShotClassification.digits`: scikit-learn's bundled 8x8 handwritten digits
  (no download; ``pip install pyro-bmaml[digits]``) with the Omniglot trick of Santoro et al.
  (2016): each rotation by 0/90/180/270 degrees is a class of its own, 40 classes in all.
  The split is by digit (all four rotations of a digit in one split, as Omniglot's
  rotations of a test character stay in the test split): 6/2/2 digits, 24/8/8 classes.
- :meth:`FewShotClassification.from_folder`: a folder with one sub-folder of images per
  class, in the Omniglot (``alphabet/character/*.png``, any depth) or miniImageNet layout
  (``train/``, ``val/``, ``test/`` sub-folders holding the class folders: the split is taken
  from them). Images are loaded with Pillow, converted to grayscale or RGB, resized, and
  cached as one tensor file beside the data (rebuilt when a file changes).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .._checks import check_choice, check_int
from ..evaluation.metrics import classification_metrics
from .base import TaskBatch

__all__ = ["FewShotClassification", "load_image_folder", "IMAGE_SUFFIXES"]

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")


class FewShotClassification:
    """N-way K-shot episodes from images grouped by class.

    :param classes: one tensor per class, ``(n_c, *input_shape)`` floats, every class with
        the same ``input_shape``.
    :param ways: N, classes per episode.
    :param shots: K, support images per class.
    :param query: Q, query images per class (15 in the MAML literature).
    :param splits: ``{"train": [...], "val": [...], "test": [...]}`` class indices (disjoint),
        or ``None`` to split at random by ``fractions``.
    :param fractions: shares of the train / val / test split when ``splits`` is ``None``.
    :param groups: one group id per class; the random split keeps a group's classes
        together (e.g. the rotations of one character). Default: every class its own group.
    :param names: class names (for messages).
    :param seed: seed of the random split.
    """

    metrics = staticmethod(classification_metrics)

    def __init__(self, classes: Sequence[torch.Tensor], ways: int = 5, shots: int = 1,
                 query: int = 15, splits: Optional[Dict[str, Sequence[int]]] = None,
                 fractions: Sequence[float] = (0.6, 0.2, 0.2),
                 groups: Optional[Sequence] = None, names: Optional[Sequence[str]] = None,
                 seed: int = 0):
        self.ways = check_int("ways", ways, 2)
        self.shots = check_int("shots", shots, 1)
        self.query = check_int("query", query, 1)
        self.seed = int(seed)
        classes = list(classes)
        if not classes:
            raise ValueError("classes is empty: give one tensor of images per class")
        shape = None
        for i, images in enumerate(classes):
            if not isinstance(images, torch.Tensor) or not images.is_floating_point():
                raise TypeError(f"classes[{i}] must be a floating tensor (n, *input_shape), "
                                f"got {type(images).__name__}")
            if images.dim() < 2:
                raise ValueError(f"classes[{i}] must be (n, *input_shape), got {tuple(images.shape)}")
            if shape is None:
                shape = tuple(images.shape[1:])
            elif tuple(images.shape[1:]) != shape:
                raise ValueError(f"classes[{i}] has images of shape {tuple(images.shape[1:])}, "
                                 f"classes[0] of {shape}: every image must have one shape")
            if not bool(torch.isfinite(images).all()):
                raise ValueError(f"classes[{i}] contains non-finite values")
        self.classes = classes
        self.input_shape = shape
        self.names = list(names) if names is not None else [f"class {i}" for i in range(len(classes))]
        if len(self.names) != len(classes):
            raise ValueError(f"names has {len(self.names)} entries for {len(classes)} classes")
        self.splits = (self._split(fractions, groups) if splits is None
                       else self._check_splits(splits))
        need = self.shots + self.query
        for split, members in self.splits.items():
            if len(members) < self.ways:
                raise ValueError(
                    f"the {split} split has {len(members)} classes, fewer than ways={self.ways}; "
                    "lower ways or give more classes")
            small = [(self.names[c], self.classes[c].size(0)) for c in members
                     if self.classes[c].size(0) < need]
            if small:
                raise ValueError(
                    f"shots + query = {need} images per class are needed, but {len(small)} "
                    f"class(es) of the {split} split have fewer, e.g. {small[0][0]!r} with "
                    f"{small[0][1]}; lower shots or query")

    def _split(self, fractions, groups) -> Dict[str, List[int]]:
        if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0):
            raise ValueError(f"fractions must be three shares >= 0 summing to 1, got {fractions}")
        groups = list(range(len(self.classes))) if groups is None else list(groups)
        if len(groups) != len(self.classes):
            raise ValueError(f"groups has {len(groups)} entries for {len(self.classes)} classes")
        unique = sorted(set(groups), key=str)
        order = torch.randperm(len(unique), generator=torch.Generator().manual_seed(self.seed))
        n_train = round(fractions[0] * len(unique))
        n_val = round(fractions[1] * len(unique))
        cut = {"train": order[:n_train], "val": order[n_train:n_train + n_val],
               "test": order[n_train + n_val:]}
        return {split: sorted(c for c, g in enumerate(groups)
                              if g in {unique[i] for i in idx.tolist()})
                for split, idx in cut.items()}

    def _check_splits(self, splits) -> Dict[str, List[int]]:
        if set(splits) != set(SPLITS):
            raise ValueError(f"splits must have the keys {SPLITS}, got {sorted(splits)}")
        out = {k: sorted(int(c) for c in splits[k]) for k in SPLITS}
        seen = {}
        for split, members in out.items():
            for c in members:
                if not 0 <= c < len(self.classes):
                    raise ValueError(f"splits[{split!r}] has class index {c}, outside "
                                     f"[0, {len(self.classes)})")
                if c in seen:
                    raise ValueError(f"class {self.names[c]!r} is in both the {seen[c]} and the "
                                     f"{split} split: splits must be disjoint")
                seen[c] = split
        return out

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def episodes(self, num_tasks: int, generator: torch.Generator, split: str = "train") -> TaskBatch:
        """``num_tasks`` episodes of ``split``'s classes: ``x (T, N*K, *input_shape)``,
        integer ``y (T, N*K)`` for the support set (and ``N*Q`` for the query set)."""
        num_tasks = check_int("num_tasks", num_tasks, 1)
        members = self.splits[check_choice("split", split, SPLITS)]
        xs, ys, xq, yq = [], [], [], []
        for _ in range(num_tasks):
            # a random choice of classes in a random order: label i is the i-th drawn class
            chosen = torch.randperm(len(members), generator=generator)[: self.ways].tolist()
            sx, sy, qx, qy = [], [], [], []
            for label, which in enumerate(chosen):
                images = self.classes[members[which]]
                pick = torch.randperm(images.size(0), generator=generator)[: self.shots + self.query]
                sx.append(images[pick[: self.shots]])
                qx.append(images[pick[self.shots:]])
                sy.append(torch.full((self.shots,), label, dtype=torch.long))
                qy.append(torch.full((self.query,), label, dtype=torch.long))
            xs.append(torch.cat(sx))
            ys.append(torch.cat(sy))
            xq.append(torch.cat(qx))
            yq.append(torch.cat(qy))
        return TaskBatch(torch.stack(xs), torch.stack(ys), torch.stack(xq), torch.stack(yq))

    def sample(self, batch_size: int, generator: torch.Generator) -> TaskBatch:
        """A meta-training batch: ``batch_size`` episodes of the train classes."""
        return self.episodes(check_int("batch_size", batch_size, 1), generator, "train")

    def evaluation_tasks(self, num_tasks: int = 600, seed: int = 12345,
                         split: str = "test") -> TaskBatch:
        """Held-out episodes (fixed by ``seed``) of the ``test`` (or ``val``) classes; the
        literature reports accuracy over 600 test episodes."""
        return self.episodes(num_tasks, torch.Generator().manual_seed(seed), split)

    def validation_tasks(self, num_tasks: int, seed: int) -> TaskBatch:
        """Episodes (fixed by ``seed``) of the ``val`` classes: tasks held out of
        meta-training, on which ``fit`` chooses the adaptation's step count after training
        (episodes of the training classes would not do: the learned prior already fits
        those classes, so they favour the fewest steps; on digits 5-shot with every weight
        latent they chose one step where ten score best on unseen classes)."""
        return self.evaluation_tasks(num_tasks, seed=seed, split="val")

    def example_args(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """One episode's support set, e.g. to set up a model."""
        batch = self.episodes(1, torch.Generator().manual_seed(0))
        return batch.x_support[0], batch.y_support[0]

    def __repr__(self) -> str:
        sizes = {k: len(v) for k, v in self.splits.items()}
        return (f"FewShotClassification({self.ways}-way {self.shots}-shot, query {self.query}, "
                f"input {self.input_shape}, classes {sizes})")

    # -- sources ----------------------------------------------------------------------
    @classmethod
    def digits(cls, ways: int = 5, shots: int = 1, query: int = 15, rotations: bool = True,
               seed: int = 0, **kwargs) -> "FewShotClassification":
        """scikit-learn's bundled 8x8 digits (1,797 images, no download), values in [0, 1],
        inputs ``(1, 8, 8)``; with ``rotations`` each of the four right-angle rotations of a
        digit is a class (40 classes), split by digit (24 / 8 / 8 classes)."""
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:  # an optional extra
            raise ImportError("the digits task source needs scikit-learn: "
                              "pip install 'pyro-bmaml[digits]'") from err
        data = load_digits()
        images = torch.as_tensor(data.images, dtype=torch.get_default_dtype()) / 16.0
        target = torch.as_tensor(data.target)
        classes, groups, names = [], [], []
        for k in (range(4) if rotations else range(1)):
            for digit in range(10):
                classes.append(torch.rot90(images[target == digit], k, dims=(-2, -1))[:, None])
                groups.append(digit)
                names.append(f"digit {digit} rotated {90 * k}")
        return cls(classes, ways, shots, query, groups=groups, names=names, seed=seed, **kwargs)

    @classmethod
    def from_folder(cls, root: Union[str, Path], ways: int = 5, shots: int = 1,
                    query: int = 15, image_size: Sequence[int] = (28, 28), channels: int = 1,
                    cache: bool = True, seed: int = 0, **kwargs) -> "FewShotClassification":
        """Episodes from a folder of class folders (see the module doc and
        :func:`load_image_folder`); ``train/val/test`` sub-folders fix the split."""
        classes, names, splits = load_image_folder(root, image_size, channels, cache)
        return cls(classes, ways, shots, query, splits=splits, names=names, seed=seed, **kwargs)


def _image_files(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_folders(root: Path) -> List[Path]:
    """Every folder under ``root`` (itself excluded) that holds image files."""
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        path = Path(dirpath)
        if path != root and _image_files(path):
            found.append(path)
    return sorted(found)


def load_image_folder(root: Union[str, Path], image_size: Sequence[int] = (28, 28),
                      channels: int = 1, cache: bool = True):
    """Load a folder of class folders as ``(classes, names, splits)``.

    Each folder holding image files is a class, named by its path relative to ``root``
    (``alphabet/character`` for Omniglot). When ``root`` has ``train``, ``val`` and ``test``
    sub-folders (miniImageNet), their classes form the splits; else ``splits`` is ``None``.
    Images are converted to grayscale (``channels=1``) or RGB (3), resized to
    ``image_size`` (H, W) with bilinear filtering, scaled to [0, 1]: ``(n, C, H, W)`` per
    class. With ``cache`` the tensors are saved to ``root/.pyro_bmaml_cache/`` under a key of
    the file list, sizes, modification times and settings, and reloaded from there.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    channels = check_int("channels", channels, 1)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    size = tuple(check_int(f"image_size[{i}]", n, 1) for i, n in enumerate(image_size))
    if len(size) != 2:
        raise ValueError(f"image_size must be (H, W), got {image_size}")
    folders = _class_folders(root)
    if not folders:
        raise ValueError(f"no class folders with images ({', '.join(IMAGE_SUFFIXES)}) under {str(root)!r}")
    names = [str(f.relative_to(root)) for f in folders]
    files = {name: _image_files(f) for name, f in zip(names, folders)}
    key = hashlib.sha256(repr((size, channels, [
        (name, [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files[name]])
        for name in names])).encode()).hexdigest()[:16]
    cache_file = root / ".pyro_bmaml_cache" / f"images-{key}.pt"
    classes = None
    if cache and cache_file.is_file():
        stored = torch.load(cache_file, weights_only=True)
        if stored.get("names") == names:
            classes = stored["classes"]
    if classes is None:
        classes = [_load_images(files[name], size, channels) for name in names]
        if cache:
            cache_file.parent.mkdir(exist_ok=True)
            tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
            torch.save({"names": names, "classes": classes}, tmp)
            os.replace(tmp, cache_file)
    splits = None
    tops = {Path(n).parts[0] for n in names}
    if set(SPLITS) <= tops:
        splits = {s: [i for i, n in enumerate(names) if Path(n).parts[0] == s] for s in SPLITS}
        if any(Path(n).parts[0] not in SPLITS for n in names):
            raise ValueError(f"{str(root)!r} has train/val/test folders and class folders "
                             "outside them; keep every class inside one split folder")
    return classes, names, splits


def _load_images(paths: Sequence[Path], size: Tuple[int, int], channels: int) -> torch.Tensor:
    try:
        from PIL import Image
    except ImportError as err:
        raise ImportError("loading image folders needs Pillow: pip install pillow") from err
    import numpy as np

    mode = "L" if channels == 1 else "RGB"
    out = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image = image.convert(mode).resize((size[1], size[0]), Image.BILINEAR)
                array = np.asarray(image, dtype=np.float32) / 255.0
        except OSError as err:
            raise ValueError(f"cannot read image {str(path)!r}: {err}") from err
        out.append(torch.from_numpy(array.reshape(size + (channels,))).permute(2, 0, 1))
    return torch.stack(out).to(torch.get_default_dtype())


from .registry import TaskFamily  # noqa: E402  (the CLI's entry for this module's family)

_DIGITS = re.compile(r"^digits-(\d+)way-(\d+)shot$")


class ClassificationFamily(TaskFamily):
    """``--task digits-NwayKshot`` (the bundled digits) or ``folder:PATH`` (an image folder),
    with :class:`~pyro_bmaml.tasks.models.BayesianClassifier` (the CLI's family entry)."""

    name = "classification"  # registered by pattern (tasks/registry.py)
    eval_tasks = 600
    init = "paper"
    inner_steps = 1  # the paper's n

    def configure(self, task, args) -> dict:
        match = _DIGITS.match(task)
        ways, shots = (int(match.group(1)), int(match.group(2))) if match else (args.ways, 1)
        if match and args.shots is not None and args.shots != shots:
            raise ValueError(f"--shots {args.shots} contradicts --task {task}")
        return {"ways": ways, "shots": args.shots or shots, "query": args.query,
                "network": args.network, "shared": args.shared,
                "shared_step_size": args.shared_step_size,
                "image_size": list(args.image_size), "channels": args.channels}

    def method_defaults(self, method: str, config: dict) -> dict:
        """Steps picked on the validation classes of digits 5-way 1-shot (200 iterations;
        BMAML 0.05 / 0.2 / 0.5, EMAML and MAML 0.4 / 1.0): BMAML's SVGD step is on the log
        joint *summed* over the N*K support points, so it is 0.5 / K; MAML's and EMAML's
        are on the *mean* cross-entropy (Finn et al.'s Omniglot step is 0.4)."""
        return {  # BMAML's step fixed and no calibration term, as the digits record was run
            "bmaml": {"step_size": 0.5 / config["shots"], "objective": "chaser",
                      "noise_step_size": None, "learn_step_size": False,
                      "calibration": "none"},
            "emaml": {"step_size": 0.4, "objective": "nll"},
            "maml": {"step_size": 1.0, "objective": "nll"},
        }[method]

    def hidden(self, config):
        return (64, 64) if config.get("network", "mlp") == "mlp" else (32,)

    def source(self, config):
        common = dict(ways=config["ways"], shots=config["shots"], query=config["query"],
                      seed=config["seed"])
        if config["task"].startswith("folder:"):
            return FewShotClassification.from_folder(
                config["task"][len("folder:"):], image_size=tuple(config["image_size"]),
                channels=config["channels"], **common)
        return FewShotClassification.digits(**common)

    def model(self, config):
        from .models import BayesianClassifier

        shape = (1, 8, 8) if config["task"].startswith("digits") else (
            config["channels"], *config["image_size"])
        return BayesianClassifier(config["ways"], shape, network=config.get("network", "mlp"),
                                  hidden=tuple(config["hidden"]),
                                  shared=config.get("shared", "none"))

    def sources(self, config, learner=None):
        source = self.source(config)
        return source, source, None

    def metrics(self, posterior, x_query, y_query):
        return classification_metrics(posterior, x_query, y_query)

    def headline(self, metrics: dict) -> str:
        return (f"accuracy {metrics['accuracy'][0]:.4f}, NLL {metrics['nll'][0]:.4f}, "
                f"ECE {metrics['ece'][0]:.4f}")

    def summary(self, metrics: dict, num_tasks: int) -> str:
        acc, nll = metrics["accuracy"], metrics["nll"]
        return "\n".join([
            f"test accuracy {acc[0]:.4f} +- {metrics['accuracy_ci95']:.4f} (95% CI over "
            f"{num_tasks} episodes of unseen classes)   test NLL {nll[0]:.4f} +- {nll[1]:.4f} "
            "(mixture, per query point)",
            f"ECE {metrics['ece'][0]:.4f}   MCE {metrics['mce'][0]:.4f} (top-label, 15 bins, "
            f"pooled; 0 is calibrated)   Brier {metrics['brier'][0]:.4f}",
        ])

    def write(self, learner, posterior, tasks, metrics, out):
        from ..evaluation import plots

        table = {k: metrics[k] for k in ("accuracy", "error_rate", "nll", "brier", "ece", "mce",
                                         "entropy_correct", "entropy_wrong")}
        table["accuracy_ci95"] = metrics["accuracy_ci95"]
        bins = metrics["reliability"]
        table["reliability"] = {k: v.tolist() for k, v in bins.items()}
        lines = [f"| {key} | {table[key][0]:.4g} | {table[key][1]:.2g} |"
                 for key in ("accuracy", "nll", "brier", "ece", "mce", "entropy_correct",
                             "entropy_wrong")]
        plots.plot_confidence_reliability({learner.method.upper(): bins}, out / "calibration.png")
        return table, lines


CLASSIFICATION_FAMILY = ClassificationFamily()
