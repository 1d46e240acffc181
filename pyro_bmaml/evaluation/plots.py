"""Plots of particle posteriors, adaptation and training, written to files.

Matplotlib's object API (``matplotlib.figure.Figure``) is used directly, so nothing here
touches pyplot's global state or needs a display. Each function saves a PNG (or any format
the file name's suffix says) and returns the path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Union

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .metrics import mixture_quantile
from ..engine.posterior import ParticlePosterior

__all__ = ["plot_predictive", "plot_ksd", "plot_calibration", "plot_reliability_panels",
           "plot_confidence_reliability", "plot_confidence_panels", "plot_training",
           "plot_curves", "plot_curve_panels"]

PathLike = Union[str, Path]


def _save(fig: Figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def plot_predictive(
    posteriors: Sequence[ParticlePosterior],
    path: PathLike,
    x_range: Sequence[float] = (-5.0, 5.0),
    truths: Optional[Sequence[Callable[[torch.Tensor], torch.Tensor]]] = None,
    queries: Optional[Sequence[tuple]] = None,
    num_points: int = 200,
) -> Path:
    """1-D regression: per-particle curves, the predictive mean, 50% and 90% bands of the
    mixture predictive, and the support points, one panel per single-task posterior."""
    n = len(posteriors)
    fig = Figure(figsize=(4.2 * n, 3.2))
    x = torch.linspace(*x_range, num_points)[:, None]
    for i, post in enumerate(posteriors):
        ax = fig.add_subplot(1, n, i + 1)
        x_dev = x.to(post.particles)
        with torch.no_grad():
            pred = post.predict(x_dev)
            loc, scale = post.potential.normal_likelihood_params(post.particles, x_dev)
            bands = {q: mixture_quantile(q, loc, scale).cpu() for q in (0.05, 0.25, 0.75, 0.95)}
        xs = x[:, 0].numpy()
        ax.fill_between(xs, bands[0.05], bands[0.95], color="C0", alpha=0.15, label="90% band")
        ax.fill_between(xs, bands[0.25], bands[0.75], color="C0", alpha=0.3, label="50% band")
        for curve in pred["particle_means"].cpu():
            ax.plot(xs, curve.numpy(), color="C0", lw=0.6, alpha=0.5)
        ax.plot(xs, pred["mean"].cpu().numpy(), color="C0", lw=2, label="predictive mean")
        if truths is not None:
            ax.plot(xs, truths[i](x[:, 0]).numpy(), "k--", lw=1, label="truth")
        if queries is not None:
            xq, yq = queries[i]
            ax.scatter(xq[:, 0].cpu(), yq.cpu(), s=12, color="C2", label="query", zorder=3)
        if post.x_support is not None:
            ax.scatter(post.x_support[:, 0].cpu(), post.y_support.cpu(), s=25, color="C3",
                       label="support", zorder=4)
        ax.set_title(f"task {i}")
        ax.set_xlabel("x")
        if i == 0:
            ax.set_ylabel("y")
            ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_ksd(ksd: torch.Tensor, path: PathLike) -> Path:
    """Squared KSD along adaptation steps: ``(steps + 1,)`` or ``(steps + 1, T)`` (median and
    interquartile range over tasks)."""
    values = ksd.detach().cpu().double()
    if values.dim() == 1:
        values = values[:, None]
    steps = np.arange(values.shape[0])
    fig = Figure(figsize=(4.5, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    q = torch.quantile(values, torch.tensor([0.25, 0.5, 0.75], dtype=values.dtype), dim=1)
    ax.plot(steps, q[1].numpy(), marker="o", label="median over tasks")
    ax.fill_between(steps, q[0].numpy(), q[2].numpy(), alpha=0.3, label="interquartile range")
    ax.set_yscale("log")
    ax.set_xlabel("adaptation step")
    ax.set_ylabel("KSD$^2$ (IMQ, V-statistic)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_calibration(coverage: Dict[float, tuple], path: PathLike, label: str = "model") -> Path:
    """Reliability diagram of one method: coverage of central predictive intervals vs their
    nominal level (mean +- s.e. over tasks), with the diagonal of perfect calibration.
    ``coverage``: ``{level: (mean, se)}`` as :func:`pyro_bmaml.evaluation.metrics.regression_metrics`
    gives it (its ``"reliability"`` entry covers 0.05..0.95)."""
    return plot_reliability_panels({"": {label: coverage}}, path)


def plot_reliability_panels(panels: Dict[str, Dict[str, Dict[float, tuple]]],
                            path: PathLike) -> Path:
    """Reliability diagrams side by side: ``{panel title: {method: {level: (mean, se)}}}``
    (observed coverage of central intervals against their nominal level)."""
    fig = Figure(figsize=(3.8 * len(panels), 3.6))
    for i, (title, methods) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
        for label, coverage in methods.items():
            levels = np.array(sorted(coverage))
            means = np.array([coverage[lv][0] for lv in levels])
            ses = np.array([coverage[lv][1] for lv in levels])
            ax.errorbar(levels, means, yerr=ses, marker="o", ms=3, capsize=2, label=label)
        _finish_unit_panel(ax, title, "nominal level of the central interval",
                           "observed coverage")
    return _save(fig, path)


def _finish_unit_panel(ax, title: str, xlabel: str, ylabel: str) -> None:
    """Axes of a reliability panel: the unit square, labels, title and legend."""
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)


def plot_confidence_reliability(methods: Dict[str, Dict[str, object]], path: PathLike) -> Path:
    """Classification reliability diagram: accuracy against confidence per bin, one line per
    method; ``methods``: ``{label: bins}`` with ``bins`` the ``"reliability"`` entry of
    :func:`pyro_bmaml.evaluation.metrics.classification_metrics`."""
    return plot_confidence_panels({"": methods}, path)


def plot_confidence_panels(panels: Dict[str, Dict[str, Dict[str, object]]],
                           path: PathLike) -> Path:
    """Classification reliability diagrams side by side: ``{panel title: {method: bins}}``
    (empty bins are skipped; the marker area follows the bin's share of the points)."""
    fig = Figure(figsize=(3.8 * len(panels), 3.6))
    for i, (title, methods) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
        for label, bins in methods.items():
            conf, acc, count = (np.asarray(torch.as_tensor(bins[k], dtype=torch.float64))
                                for k in ("confidence", "accuracy", "count"))
            keep = count > 0
            line, = ax.plot(conf[keep], acc[keep], marker="o", ms=3, label=label)
            ax.scatter(conf[keep], acc[keep], s=400 * count[keep] / count.sum(),
                       color=line.get_color(), alpha=0.3)
        _finish_unit_panel(ax, title, "confidence (top-label probability)", "accuracy")
    return _save(fig, path)


def plot_training(history: Dict[str, list], path: PathLike) -> Path:
    """Meta-training curves: each meta-loss term per iteration (``history["terms"]``, else the
    total) and the held-out scores (MSE, NLL and 90% coverage; error rate and ECE; returns).

    The chaser loss is the squared distance from the chaser to the leader, a moving target:
    it can rise while held-out error falls (e.g. as the particles spread out and the leader's
    extra step moves them further); the held-out curves are the measure of progress."""
    fig = Figure(figsize=(9, 3.2))
    ax = fig.add_subplot(1, 2, 1)
    terms = history.get("terms") or []
    names = sorted({k for t in terms for k in t})
    if names and len(terms) == len(history["iteration"]):
        for name in names:
            ax.plot(history["iteration"], [t.get(name, np.nan) for t in terms], lw=0.6,
                    label=name)
        ax.legend(fontsize=7)
    else:
        ax.plot(history["iteration"], history["loss"], lw=0.6)
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("meta-loss terms (chaser: a moving target)", fontsize=8)
    ax2 = fig.add_subplot(1, 2, 2)
    evals = history.get("eval") or []
    if evals:
        its = [e["iteration"] for e in evals]
        keys = [k for k in ("mse", "nll", "error_rate", "ece", "return", "return_before")
                if all(k in e for e in evals)]
        for key, color in zip(keys, ("C0", "C1", "C3", "C4")):
            mu = np.array([e[key][0] for e in evals])
            se = np.array([e[key][1] for e in evals])
            ax2.errorbar(its, mu, yerr=se, marker="o", color=color, label=f"held-out {key}")
        if all(e[k][0] > 0 for e in evals for k in keys):  # returns are negative: linear
            ax2.set_yscale("log")
        if all("coverage" in e for e in evals):
            ax3 = ax2.twinx()
            ax3.plot(its, [e["coverage"]["0.9"][0] for e in evals], "s--", color="C2",
                     label="90% coverage")
            ax3.axhline(0.9, color="C2", lw=0.5)
            ax3.set_ylim(0, 1)
            ax3.legend(fontsize=7, loc="lower right")
        ax2.legend(fontsize=7, loc="upper right")
    ax2.set_xlabel("meta-iteration")
    return _save(fig, path)


def _draw_curves(ax, curves: Dict[str, tuple], log_y: bool) -> None:
    for label, (x, mean, se) in curves.items():
        x, mean, se = map(np.asarray, (x, mean, se))
        ax.plot(x, mean, marker="o", ms=3, label=label)
        ax.fill_between(x, mean - se, mean + se, alpha=0.25)
    if log_y:
        ax.set_yscale("log")
    ax.legend(fontsize=7)


def plot_curves(
    curves: Dict[str, tuple], path: PathLike, xlabel: str, ylabel: str, log_y: bool = True
) -> Path:
    """Several mean +- s.e. curves: ``{label: (x, mean, se)}`` (e.g. active learning)."""
    fig = Figure(figsize=(5, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    _draw_curves(ax, curves, log_y)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _save(fig, path)


def plot_curve_panels(panels: Dict[str, Dict[str, tuple]], path: PathLike, xlabel: str,
                      columns: int = 4, hlines: Optional[Dict[str, float]] = None) -> Path:
    """A grid of curve plots: ``{panel title: {label: (x, mean, se)}}`` (e.g. learning
    curves of several methods per metric and setting). A title holding "coverage" gets a
    linear axis from 0 to 1; others a log axis when every value is positive (returns,
    which are negative, a linear one). ``hlines``: ``{panel title: y}`` reference
    lines (e.g. a nominal coverage, a predict-zero score)."""
    rows = -(-len(panels) // columns)
    cols = min(columns, len(panels))
    fig = Figure(figsize=(3.6 * cols, 2.9 * rows))
    for i, (title, curves) in enumerate(panels.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        coverage = "coverage" in title
        positive = all(m > 0 for _, means, _ in curves.values() for m in means)
        _draw_curves(ax, curves, log_y=not coverage and positive)
        if coverage:
            ax.set_ylim(0, 1)
        if hlines and title in hlines:
            ax.axhline(hlines[title], color="k", lw=0.8, ls=":")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
    fig.tight_layout()
    return _save(fig, path)
