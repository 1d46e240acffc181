r"""Meta-learners: Bayesian MAML (chaser loss or BFA) and the MAML / EMAML baselines.

All learners are :class:`torch.nn.Module` s whose one parameter is ``theta0``: the initial
particles, flat and unconstrained, shape ``(M, D)``, one row per particle. That set of
particles *is* the learned prior (Yoon et al., "Bayesian Model-Agnostic Meta-Learning",
NeurIPS 2018). A meta-batch of ``T`` tasks is processed at once: ``theta0`` is expanded to
``(T, M, D)`` and adapted by the engine's batched transport; no python loop over tasks or
particles.

Chaser loss (BMAML's meta-objective), for each task:

.. math::

    \Theta^n = \mathrm{SVGD}_n(\Theta_0; D^{trn}), \quad
    \Theta^{n+s} = \mathrm{SVGD}_s(\Theta^n; D^{trn} \cup D^{val}), \quad
    L = \sum_m \lVert \theta^{n,m} - \mathrm{stopgrad}(\theta^{n+s,m}) \rVert^2,

averaged over tasks; the gradient flows through the chaser only. BFA instead minimizes
:math:`-\sum_{val} \log \frac1M \sum_m p(y \mid x, \theta^{n,m})`.

**Calibration (the noise sites).** The chaser distance leaves out the model's noise sites
(the official code leaves out the precisions), so nothing meta-learns the noise level and
the predictive intervals come out far too narrow (90% intervals covering a third of the
targets). The noise precision also sets the size of the likelihood's pull in every
adaptation step (the step on the weights is proportional to it), so lowering it in the
initial particles to widen the predictive weakens adaptation and raises the MSE (measured
in ``results/calibration.md``). With ``calibration="noise_offset"`` (the default) the
adapted particles' noise coordinates are shifted by a meta-learned offset :math:`\delta`
(one per noise coordinate, shared by the particles) *after* adaptation,

.. math::

    \tilde\theta^{n,m}_{noise} = \theta^{n,m}_{noise} + \delta, \qquad
    L^{cal}(\delta) = -\frac{1}{Q}\sum_{val} \log \frac1M \sum_m
        p\big(y \mid x, \mathrm{sg}(\theta^{n,m}_{net}), \mathrm{sg}(\theta^{n,m}_{noise})
        + \delta\big),

the query mixture negative log likelihood per point, a proper scoring rule on held-out data
(as temperature scaling is for classifiers, Guo et al. 2017, here meta-learned across
tasks). As temperature scaling fits its temperature on a validation set, the offset is best
learned on tasks the initial particles are *not* trained on (``fit(calibration_tasks=...)``,
e.g. :meth:`~pyro_bmaml.tasks.base.TaskPool.split`): on a small pool (|T| = 100) the particles
meta-overfit the pool's tasks, their residuals there understate those on new tasks, and an
offset learned on the training batches makes the intervals too narrow on new tasks. One
global offset also gives every task the same noise shift, so the mixture's tails are too
light across tasks of very different difficulty (intervals right at 90% are too wide at
50%); by default a meta-learned scale of the noise coordinates' change during adaptation,
:math:`\theta_0 + e^s(\theta^n - \theta_0) + \delta`, lets each task's support residuals
set its noise level more strongly (``noise_adaptation_scale``). The offset learns the
noise level the few-step posterior needs for its predictive to be calibrated on unseen points; adaptation itself (and so the MSE) is exactly that of the
uncalibrated learner, since the offset enters after it and its loss reaches nothing else.
The noise sites are found from the model
(:meth:`~pyro_bmaml.engine.potential.ModelPotential.noise_sites`): sites the likelihood depends on
and the predictive mean does not. The other candidates, compared side by side in
``results/calibration.md``, stay available: ``"initial_noise"`` (the same query-NLL loss on
the noise coordinates of ``theta0``, first order), ``"distance"`` (the noise sites in the
chaser distance with weight ``calibration_weight``), ``"mixture"`` (chaser + the query
mixture NLL per point, or ``calibration_weight`` x BFA when a weight is given; full
gradient), and ``"none"`` (the official code).

**A model without noise sites** (a classifier) has no noise level to calibrate, and its
confidence is the scale of its weights, which the chaser distance alone sets. On a
discriminative classifier that distance has no fixed point: the leader, a step further on
more points, is always a sharper softmax than the chaser, so the distance keeps pulling
``theta0`` outward. BMAML's default there is ``"mixture"``: the query mixture NLL per
point (BFA's term over the query count, a proper scoring rule) is added to the chaser
distance and reaches all of ``theta0``.
On the families suite's N-way family with ten SVGD steps the chaser alone grew
``theta0``'s norm from 1 to 52 in 1,000 meta-iterations (accuracy 0.58 -> 0.24, ECE 0.68);
with the term it held at 0.8 (accuracy 0.57, ECE 0.10); with three steps the term raised
the gap closed from 0.27 to 0.32 and lowered the ECE from 0.056 to 0.041 at Adam lr 5e-2
(0.29 -> 0.36, 0.041 -> 0.031 at 1e-2); see the README.
The mixture of a few particles adapted a few steps can still be under-confident (its
particles disagree more than their accuracy warrants: on that N-way family, mean top-label
confidence 0.485 against accuracy 0.570). ``learn_predictive_temperature=True`` is a
classifier's counterpart of the noise offset: a meta-learned temperature :math:`T` of the
mixture predictive, :math:`p_T(y) \propto \bar p(y)^{1/T}` over the likelihood's finite
support, trained by the tempered query mixture NLL of the adapted particles cut from their
graph (temperature scaling, Guo et al. 2017, meta-learned across tasks); it changes
confidence, never the ranking of the classes, so accuracy is untouched.

**Task data.** The learners get a task batch's data through its
:meth:`~pyro_bmaml.tasks.base.TaskBatch.adaptation_data` (support for the chaser and the
adaptation, support + query for the leader, query for the held-out losses), re-asked before
every step when the data depend on the particles (meta-RL rollouts); with
:class:`~pyro_bmaml.tasks.models.GaussianMLPPolicy` and ``temperature`` the chaser's SVGD steps
are Stein variational policy gradient, the meta-RL setting of the paper.

**Baselines as the papers ran them.** :class:`MAML` (Finn et al., 2017) and :class:`EMAML`
take their inner steps on the mean squared error of the model's predictive mean (equivalently
the log likelihood at a fixed noise level), ``theta <- theta - alpha * grad mean_n (f(x_n) -
y_n)^2``, and meta-learn the query MSE (summed over EMAML's particles, as the official EMAML
code). Finn's alpha = 0.01 is MAML's default, the official EMAML's 1e-3 EMAML's. They get
the same meta-learned noise offset as BMAML, so that all methods' NLL and coverage are
comparable; it does not touch the network coordinates, so their MSE is the papers'. The
previous variants (inner gradient ascent on the whole log joint, query-NLL meta-loss) are
``objective="log_joint"``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from .._checks import (all_finite, check_bool, check_choice, check_has_data, check_int,
                       check_nonnegative_float, check_positive_float, value_checks_enabled)
from ..engine.empirical_bayes import empirical_bayes_prior
from ..engine.kernels import RBFSteinKernel, SteinKernel, as_differentiable_kernel
from ..engine.ksd import ksd_trajectory
from ..engine.learned_prior import GaussianPrior
from ..engine.posterior import (ParticlePosterior, mixture_log_likelihood, model_with_prior,
                                particle_prior, support_log_density, tempered_log_predictive)
from ..engine.potential import ModelPotential
from ..engine.svgd import transport
from ..tasks.base import TaskBatch

__all__ = ["MetaLearner", "BMAML", "EMAML", "MAML"]

InitSpec = Union[str, torch.Tensor, Dict[str, torch.Tensor]]


def _detached(shared: Optional[Dict[str, torch.Tensor]]) -> Optional[Dict[str, torch.Tensor]]:
    """Per-task shared parameters cut from the graph (``None`` stays ``None``)."""
    return None if shared is None else {k: v.detach() for k, v in shared.items()}
SiteSpec = Union[str, Sequence[str], None]


#: the step-count selection's fitted temperatures lie in [e^-b, e^b] = [1e-2, 1e2]
LOG_TEMPERATURE_BOUND = math.log(100.0)


def _default_selected_steps(state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook: a state saved before :attr:`MetaLearner.adapt_steps`
    existed has no ``selected_steps``; it loads as "none chosen" (``inner_steps``). One saved
    before ``learn_predictive_temperature`` existed has no temperature (none learned)."""
    state_dict.setdefault(prefix + "selected_steps", torch.tensor(-1))
    state_dict.setdefault(prefix + "log_predictive_temperature", torch.zeros(0))


class MetaLearner(nn.Module):
    r"""Common part of the meta-learners: the initial particles and the public methods.

    :param model: a Pyro task model called as ``model(x, y)`` (see :mod:`pyro_bmaml.tasks.models`).
    :param num_particles: M.
    :param inner_steps: adaptation steps on the support set (n).
    :param step_size: adaptation step size.
    :param init: ``"auto"`` (default: the model's ``paper_init`` when it has one, else
        ``"prior"``), ``"prior"`` (draws from the model's prior), ``"paper"`` (the model's
        ``paper_init``, e.g. :meth:`BayesianMLP.paper_init`), a flat ``(M, D)`` tensor or a
        dict of constrained site values with leading dim M. A model that knows how its
        weights should start says so with ``paper_init``: prior draws of the paper's
        1-40-40-40-1 network (weight precision ~ Gamma(2, 2)) give outputs of order 100, and
        the first SVGD step of 1e-3 on them overflows.
    :param example_args: one task's ``(x, y)`` to discover the model's sites; defaults to
        ``model.example_args()`` when the model has it.
    :param noise_sites: the latent sites that set the observation noise. ``"auto"``: the
        model's ``noise_sites`` attribute if it has one, else those found by
        :meth:`ModelPotential.noise_sites`; or a list of names; or ``None`` for none.
    :param calibration: how the noise sites are meta-learned (see the module docs):
        ``"noise_offset"``, ``"initial_noise"`` or ``"none"`` (and, for :class:`BMAML`,
        ``"distance"``, ``"mixture"``). ``None`` picks the learner's default:
        ``"noise_offset"`` when the model has noise sites.
    :param calibration_lr: Adam learning rate of the noise offset (it has to move by several
        units in log-precision, which ``theta0``'s 1e-3 would take thousands of iterations to
        do); used by :meth:`optimizer_groups`.
    :param noise_step_size: adaptation step size of the noise coordinates (default: the same
        as ``step_size``).
    :param offset_per_particle: one noise offset per particle instead of one shared offset
        (a candidate; worse on sinusoid, ``results/calibration.md``).
    :param noise_adaptation_scale: with ``"noise_offset"`` (default there: ``None`` means
        on), also meta-learn (on the same query NLL) a log-scale :math:`s` of the noise
        coordinates' change during adaptation, :math:`\theta_0 + e^s(\theta^n - \theta_0)
        + \delta` (a learned noise step size in effect, applied after adaptation so that the
        network coordinates are untouched): it lets the predictive noise follow each task's
        support residuals more (or less) than the SVGD step does. With one global offset
        the mixture's tails are too light for tasks of very different difficulty (sinusoid
        amplitudes 0.1 to 5): intervals calibrated at 90% are too wide at 50%; the scale
        lets the noise differ by task (``results/sinusoid.md``). No effect on learners whose
        adaptation leaves the noise coordinates alone (EMAML and MAML on the MSE).
    :param shared_step_size: with a model that has shared parameters (e.g.
        :class:`~pyro_bmaml.tasks.models.BayesianClassifier` with ``shared="features"``), adapt them
        to each task in the inner loop too: at every adaptation step, alongside the
        particles' step, :math:`\phi \leftarrow \phi - \alpha_\phi \nabla_\phi
        \big(-\frac{1}{MN}\sum_{m,n} \log p(y_n \mid x_n, \theta_m, \phi)\big)` (one
        copy per task, differentiable, so the meta-gradient reaches :math:`\phi` through it as
        MAML's does). ``None`` (default): the shared parameters are not adapted, only
        meta-learned.
    :param chaser_trains_noise: let the meta-loss of the adapted particles (chaser, query MSE)
        reach ``theta0``'s noise coordinates, as the official code does. ``False``
        (default) cuts it. The noise precision is the adaptation's step size in effect (the
        likelihood's pull on every other coordinate is proportional to it), so the chaser
        loss moves it to change how far the chaser travels, not to fit the noise: on a
        user's regression with particles started as prior draws it pushed the precision up
        until the precision's own SVGD update, proportional to it, overflowed (non-finite
        steps at Adam rates 1e-2 to 5e-2, ``tests/test_families.py``). The noise is learned
        by the calibration term instead, a proper scoring rule; the steps by
        ``learn_step_size``.
    :param learn_step_size: meta-learn the adaptation step of every site but the noise sites,
        one log-step per site, from ``step_size`` (Meta-SGD, Li et al. 2017, per site rather
        than per coordinate), by the learner's own meta-loss (the chaser's: a step that
        lands the chaser nearer the leader). The default step is a guess of the likelihood's
        scale (1e-3 suits the paper's sinusoid, where the noise precision is 100 and K = 10,
        and barely moves a model whose precision is 10 and K = 3); a learned step removes
        that guess. The noise sites keep ``noise_step_size`` (their post-adaptation scale is
        learned by the calibration, ``noise_adaptation_scale``). Each learned step is at most
        ``2 / c`` (``max_step_sizes``), ``c`` the log prior's largest curvature in the site
        at the initial particles: past it one step's pull toward the prior's mode overshoots
        it, and grows each step (for a ``Normal(0, s)`` prior: ``2 s^2``). On the digits MLP
        with every weight latent the query NLL lengthened the head's step from 0.5 to
        112-154 and all three seeds fell to chance; bounded at 2, BMAML's test accuracy is
        0.751 +- 0.035, EMAML's 0.740 (``results/fewshot_learned_steps.md``, README). Default ``False`` here and
        for the baselines (the papers' fixed alpha), ``True`` for :class:`BMAML`.
    :param step_size_lr: Adam learning rate of the log-steps (fixed, whatever ``lr``).
    :param learn_predictive_temperature: for a likelihood over finitely many values (a
        classifier: ``Categorical`` or ``Bernoulli``), meta-learn a temperature :math:`T`
        of the adapted particles' mixture predictive, :math:`p_T(y) \propto \bar p(y)^{1/T}`
        (:func:`~pyro_bmaml.engine.posterior.tempered_log_predictive`; temperature scaling,
        Guo et al. 2017, fitted across tasks during meta-training instead of on one
        validation set): a meta-loss term, the tempered query mixture NLL per point of the
        adapted particles, cut from their graph so that only :math:`T` learns from it (at
        ``calibration_lr``; on ``fit``'s held-out calibration tasks where it has them).
        :meth:`adapt` returns posteriors with the learned :math:`T`; ``fit``'s step-count
        selection (:meth:`select_adapt_steps`) refits it for the count it chooses, so it
        belongs to :attr:`adapt_steps` (``adapt(num_steps=n)`` with another count keeps
        it: refit with ``select_adapt_steps(tasks, candidates=[n])``). It is the classifier's
        counterpart of the noise calibration: the mixture of a few particles adapted a few
        steps can be under-confident (its particles disagree more than their accuracy
        warrants) or over-confident, and a classifier has no noise site to absorb it.
        Default ``False``.
    :param learn_prior: ``None`` (default): the adaptation's target is the model's own
        posterior, its priors included. ``"diagonal"`` or ``"full"``: the target's prior is
        a meta-learned Gaussian over the flat unconstrained vector
        (:class:`~pyro_bmaml.engine.learned_prior.GaussianPrior`, ``self.learned_prior``),
        started at the model's prior's per-coordinate mean and standard deviation (512
        draws) and learned through the adaptation steps, alongside ``theta0``, by the
        query loss (BMAML's chaser: by the chaser's query mixture NLL, as its learned
        steps: the chaser distance alone is minimised by a prior so tight that neither
        chaser nor leader moves). The adapted particles are then a posterior under a prior
        learned from the family, not under the model's: a start and a step can only go so
        far when the model's prior is wrong for the family (on the families suite's N-way
        family every learner plateaued at the accuracy MAP under the model's N(0, 1) gets,
        below exact inference under a broad prior; ``results/families_ceilings.md``).
        ``"full"`` learns correlations (D <= 2,048); it needs enough adaptation steps for
        the prior to shape the posterior (``inner_steps``). After meta-training it is a
        prior for any inference: :meth:`prior_distribution` returns it. Not with
        :class:`EMAML` / :class:`MAML`'s MSE or NLL inner objectives (no prior in them).
    :param prior_lr: Adam learning rate of the learned prior's parameters (fixed, whatever
        ``lr``: a precision factor moved at ``theta0``'s 5e-2 overshoots).
    """

    method = "meta"
    calibrations = ("noise_offset", "initial_noise", "none")

    def __init__(
        self,
        model: Callable,
        num_particles: int,
        inner_steps: int,
        step_size: float,
        init: InitSpec = "auto",
        example_args: Optional[Sequence] = None,
        noise_sites: SiteSpec = "auto",
        calibration: Optional[str] = None,
        noise_step_size: Optional[float] = None,
        calibration_lr: float = 1e-2,
        offset_per_particle: bool = False,
        chaser_trains_noise: bool = False,
        noise_adaptation_scale: Optional[bool] = None,
        shared_step_size: Optional[float] = None,
        learn_step_size: bool = False,
        step_size_lr: float = 1e-2,
        learn_predictive_temperature: bool = False,
        learn_prior: Optional[str] = None,
        prior_lr: float = 3e-3,
    ):
        """Build the learner; the arguments are documented on the class (``help(type(self))``)."""
        super().__init__()
        self.model = model
        self.potential = ModelPotential(model)
        #: the last empirical-Bayes prior fit (:meth:`prior_distribution`), or None
        self.prior_fit = None
        self.num_particles = check_int("num_particles", num_particles, 1)
        self.inner_steps = check_int("inner_steps", inner_steps, 0)
        self.step_size = check_positive_float("step_size", step_size)
        # the adaptation's step count chosen on held-out tasks (select_adapt_steps); -1: none
        self.register_buffer("selected_steps", torch.tensor(-1))
        self._register_load_state_dict_pre_hook(_default_selected_steps)
        if example_args is None:
            if not hasattr(model, "example_args"):
                raise TypeError(
                    "example_args=(x, y) is required for a model without an example_args() method"
                )
            example_args = model.example_args()
        self.potential.setup(*example_args)
        self.potential.check_returned_mean()
        #: one point's input and target shapes, from the example task (for input checks)
        self.input_shape, self.target_shape = (
            tuple(a.shape[1:]) if isinstance(a, torch.Tensor) and a.dim() else None
            for a in (tuple(example_args) + (None, None))[:2])
        self.theta0 = nn.Parameter(self._initial_particles(init, example_args))
        self.noise_sites = self._resolve_noise_sites(noise_sites, example_args)
        self.register_buffer("noise_mask", self.potential.columns_of(self.noise_sites),
                             persistent=False)
        self.calibration = check_choice(
            "calibration", self.default_calibration() if calibration is None else calibration,
            self.calibrations)
        if self.calibration not in ("none", "mixture") and not self.noise_sites:
            raise ValueError(
                f"calibration={self.calibration!r} needs noise sites, and the model has none "
                "(a latent site the likelihood depends on and the returned mean does not); "
                "pass noise_sites=[...] or calibration='none'"
            )
        self.noise_step_size = (None if noise_step_size is None
                                else check_positive_float("noise_step_size", noise_step_size))
        self.calibration_lr = check_positive_float("calibration_lr", calibration_lr)
        self.chaser_trains_noise = bool(chaser_trains_noise)
        #: meta-learned shift of the adapted noise coordinates ("noise_offset"), (D_noise,)
        width = int(self.noise_mask.sum()) if self.calibration == "noise_offset" else 0
        self.offset_per_particle = bool(offset_per_particle)
        shape = (self.num_particles, width) if self.offset_per_particle else (width,)
        self.noise_offset = nn.Parameter(torch.zeros(shape, dtype=self.theta0.dtype))
        #: meta-learned log-scale of the noise coordinates' change during adaptation
        #: (``noise_adaptation_scale``), (D_noise,); empty when off
        self.noise_adaptation_scale = (self.calibration == "noise_offset"
                                       if noise_adaptation_scale is None
                                       else bool(noise_adaptation_scale))
        if self.noise_adaptation_scale and self.calibration != "noise_offset":
            raise ValueError("noise_adaptation_scale=True needs calibration='noise_offset', "
                             f"got {self.calibration!r}")
        self.noise_log_scale = nn.Parameter(torch.zeros(
            width if self.noise_adaptation_scale else 0, dtype=self.theta0.dtype))
        self.shared_step_size = (None if shared_step_size is None
                                 else check_positive_float("shared_step_size", shared_step_size))
        if self.shared_step_size is not None and not self.shared_parameters:
            raise ValueError("shared_step_size adapts the model's shared parameters, and the "
                             f"model ({type(model).__name__}) has none (torch.nn.Parameter "
                             "attributes, e.g. BayesianClassifier(shared='features'))")
        steps = torch.full((self.potential.dim,), self.step_size)
        if self.noise_step_size is not None:
            steps[self.noise_mask] = self.noise_step_size
        self.register_buffer("base_step_sizes", steps, persistent=False)
        self.learn_step_size = bool(learn_step_size)
        self.step_size_lr = check_positive_float("step_size_lr", step_size_lr)
        #: the sites whose adaptation step is meta-learned (Meta-SGD, one log-step per site):
        #: every site but the noise sites (see ``learn_step_size``)
        self.learned_step_sites = ([n for n in self.potential.site_names
                                    if n not in self.noise_sites] if self.learn_step_size else [])
        learned = [s for s in self.potential.sites if s.name in self.learned_step_sites]
        self.log_step_size = nn.Parameter(torch.tensor(
            [math.log(self.step_size)] * len(learned), dtype=self.theta0.dtype))
        # column -> index into log_step_size (len(learned): a fixed step)
        index = torch.full((self.potential.dim,), len(learned), dtype=torch.long)
        for i, site in enumerate(learned):
            index[site.columns] = i
        self.register_buffer("_step_index", index, persistent=False)
        #: the largest step of each learned site, ``2 / c``, ``c`` the largest curvature of
        #: the log prior in its coordinates at the initial particles (see ``learn_step_size``)
        self.register_buffer("max_step_sizes", self._prior_step_bounds(learned, example_args),
                             persistent=False)
        self.learn_predictive_temperature = check_bool("learn_predictive_temperature",
                                                       learn_predictive_temperature)
        if self.learn_predictive_temperature and self.potential.observation_support is None:
            raise ValueError(
                "learn_predictive_temperature=True needs a likelihood over finitely many values "
                f"(Categorical or Bernoulli); the model's observed site "
                f"{self.potential.observation_site!r} has none")
        #: meta-learned log of the predictive temperature (``learn_predictive_temperature``),
        #: ``(1,)``; empty when off
        self.log_predictive_temperature = nn.Parameter(torch.zeros(
            1 if self.learn_predictive_temperature else 0, dtype=self.theta0.dtype))
        if learn_prior is not None:
            check_choice("learn_prior", learn_prior, ("diagonal", "full"))
        self.prior_lr = check_positive_float("prior_lr", prior_lr)
        #: the meta-learned Gaussian prior of the adaptation's target (``learn_prior``), or None
        self.learned_prior = (None if learn_prior is None else GaussianPrior.from_samples(
            self._prior_draws(example_args), learn_prior).to(self.theta0.dtype))

    @property
    def learn_prior(self) -> Optional[str]:
        """The learned prior's form (``"diagonal"`` or ``"full"``), or ``None``."""
        return None if self.learned_prior is None else self.learned_prior.form

    def _prior_draws(self, example_args, num: int = 512) -> torch.Tensor:
        """``num`` draws of the model's prior (flat, unconstrained), from a fixed seed and
        without touching the global random state: where the learned prior starts."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return self.potential.sample_prior(num, *example_args)

    def target(self) -> ModelPotential:
        """The potential the adaptation steps follow: the model's (:attr:`potential`,
        with the shared parameters of :meth:`adapted_model` inside one), or with
        ``learn_prior`` its likelihood under the learned prior
        (:meth:`~pyro_bmaml.engine.potential.ModelPotential.with_prior`)."""
        if self.learned_prior is None:
            return self.potential
        return self.potential.with_prior(self.learned_prior.log_prob)

    def _prior_step_bounds(self, sites, example_args) -> torch.Tensor:
        r"""``2 / c`` per site of ``sites`` (``inf`` where the prior is flat), ``c`` the largest
        diagonal curvature :math:`-\partial^2 \log p(\theta) / \partial\theta_i^2` of the log
        prior (unconstrained, with its Jacobian: the joint's log density less the
        likelihood's on the example task) over the site's coordinates and the initial
        particles: the Hessian's row sums, its diagonal for a prior that factorises over
        coordinates."""
        if not sites:
            return torch.zeros(0, dtype=self.theta0.dtype)
        dtype = next((a.dtype for a in example_args  # the example's (a model's own may differ)
                      if isinstance(a, torch.Tensor) and a.is_floating_point()), self.theta0.dtype)
        theta = self.theta0.detach().to(dtype).requires_grad_(True)
        with torch.enable_grad():
            log_prior = (self.potential.log_density(theta, *example_args)
                         - self.potential.log_likelihood(theta, *example_args).sum(-1))
            (grad,) = torch.autograd.grad(log_prior.sum(), theta, create_graph=True)
            (rows,) = torch.autograd.grad(grad.sum(), theta)
        curvature = (-rows).clamp_min(0).amax(0)  # (D,)
        largest = torch.stack([curvature[s.columns].max() for s in sites])
        return (2.0 / largest).to(self.theta0.dtype)  # 2 / 0 = inf: a flat prior, no bound

    def default_calibration(self) -> str:
        return "noise_offset" if self.noise_sites else "none"

    @property
    def step_sizes(self) -> torch.Tensor:
        """The adaptation step of every coordinate, ``(D,)``: the fixed ``step_size`` /
        ``noise_step_size``, or, with ``learn_step_size``, the meta-learned step of each
        site (differentiable in ``log_step_size``)."""
        if not self.log_step_size.numel():
            return self.base_step_sizes
        learned = torch.cat([self._site_steps(), self.log_step_size.new_zeros(1)])[self._step_index]
        fixed = self._step_index == self.log_step_size.numel()
        return torch.where(fixed, self.base_step_sizes.to(learned), learned)

    def learned_step_sizes(self) -> Dict[str, float]:
        """``{site: step}`` of the sites whose step is meta-learned (empty when none), each at
        most its ``max_step_sizes`` bound."""
        return dict(zip(self.learned_step_sites, self._site_steps().detach().tolist()))

    def _site_steps(self) -> torch.Tensor:
        """The learned step of each site, ``exp(log_step_size)`` bounded by ``max_step_sizes``."""
        return torch.minimum(self.log_step_size.exp(), self.max_step_sizes.to(self.log_step_size))

    @property
    def predictive_temperature(self) -> float:
        """The temperature of the predictive :meth:`adapt` returns: the meta-learned one
        (``learn_predictive_temperature``), else 1."""
        if not self.log_predictive_temperature.numel():
            return 1.0
        return float(self.log_predictive_temperature.detach().exp())

    @property
    def has_calibration_term(self) -> bool:
        """Whether the meta-loss has the query-NLL calibration term (``"noise_offset"`` or
        ``"initial_noise"``), the term ``fit(calibration_tasks=...)`` feeds."""
        return self.calibration in ("noise_offset", "initial_noise")

    @property
    def shared_parameters(self) -> List[nn.Parameter]:
        """The model's own :class:`torch.nn.Parameter` s (e.g. the shared feature extractor
        of :class:`~pyro_bmaml.tasks.models.BayesianClassifier` with ``shared="features"``):
        shared by every particle and task, not adapted by SVGD, meta-learned with
        ``theta0``."""
        return list(self.model.parameters()) if isinstance(self.model, nn.Module) else []

    def optimizer_groups(self, lr: float) -> List[dict]:
        """Adam parameter groups: ``theta0`` and the model's shared parameters at ``lr``,
        the noise offset and scale at ``calibration_lr`` and the learned step sizes at
        ``step_size_lr`` (fixed rates, whatever ``lr``: they move a few units in log space
        whatever the particles' scale; the schedule's decay applies to every group)."""
        groups = [{"params": [self.theta0] + self.shared_parameters, "lr": lr}]
        if self.noise_offset.numel():
            groups.append({"params": [self.noise_offset, self.noise_log_scale],
                           "lr": self.calibration_lr})
        if self.log_predictive_temperature.numel():
            groups.append({"params": [self.log_predictive_temperature],
                           "lr": self.calibration_lr})
        if self.log_step_size.numel():
            groups.append({"params": [self.log_step_size], "lr": self.step_size_lr})
        if self.learned_prior is not None:
            groups.append({"params": list(self.learned_prior.parameters()), "lr": self.prior_lr})
        return groups

    def _resolve_noise_sites(self, noise_sites: SiteSpec, example_args) -> List[str]:
        if noise_sites is None:
            return []
        if isinstance(noise_sites, str):
            check_choice("noise_sites", noise_sites, ("auto",))
            if hasattr(self.model, "noise_sites"):
                noise_sites = self.model.noise_sites
            else:
                found = self.potential.noise_sites(*example_args)
                if found is None:
                    warnings.warn(
                        "the model returns no predictive mean, so its noise sites cannot be "
                        "found and the predictive noise will not be calibrated; return the "
                        "mean from the model or pass noise_sites=[...]", stacklevel=3)
                return found or []
        noise_sites = list(noise_sites)
        self.potential.columns_of(noise_sites)  # raises on unknown names
        return noise_sites

    def _initial_particles(self, init: InitSpec, example_args) -> torch.Tensor:
        m, d = self.num_particles, self.potential.dim
        if isinstance(init, str):
            check_choice("init", init, ("auto", "prior", "paper"))
            if init == "auto":
                init = "paper" if hasattr(self.model, "paper_init") else "prior"
            if init == "prior":
                return self.potential.sample_prior(m, *example_args)
            if not hasattr(self.model, "paper_init"):
                raise ValueError("init='paper' needs a model with a paper_init(num_particles) method")
            return self.potential.pack(self.model.paper_init(m)).detach()
        if isinstance(init, dict):
            init = self.potential.pack(init)
        if not isinstance(init, torch.Tensor):
            raise TypeError(
                f"init must be 'auto', 'prior', 'paper', a ({m}, {d}) tensor or a dict of site values, "
                f"got {type(init).__name__}"
            )
        if tuple(init.shape) != (m, d):
            raise ValueError(f"init must have shape ({m}, {d}) (M, D), got {tuple(init.shape)}")
        if not bool(torch.isfinite(init).all()):
            raise ValueError("init contains non-finite values")
        return init.detach().clone()

    # -- to implement -----------------------------------------------------------------
    def adapt_particles(
        self, particles: torch.Tensor, data: tuple, num_steps: int,
        callback=None, step_size: Optional[float] = None,
    ) -> torch.Tensor:
        """Adapt ``(T, M, D)`` particles on task data: the model's arguments ``data``, each
        with a leading task dim (e.g. ``(x, y)`` of shapes ``(T, N, in)``, ``(T, N)``, from
        the batch's :meth:`~pyro_bmaml.tasks.base.TaskBatch.adaptation_data`).

        ``callback(step, particles, log_p, grad_log_p)`` is called before each step and after
        the last with ``None`` scores (as :func:`~pyro_bmaml.engine.svgd.transport` does).
        ``step_size`` overrides the learner's (the noise step is scaled alike)."""
        raise NotImplementedError

    def meta_loss(self, batch: TaskBatch,
                  calibration_batch: Optional[TaskBatch] = None) -> torch.Tensor:
        """The meta-objective of a batch of tasks (a scalar, differentiable in theta0).

        ``calibration_batch``: held-out tasks for the calibration term (see
        :meth:`add_calibration_loss`); default: the batch itself. Its parts are kept in
        ``self.loss_terms`` (detached 0-dim tensors: no host sync) for logging."""
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------
    def adapt_state(self, particles: torch.Tensor, data: tuple,
                    num_steps: int, callback=None, step_size: Optional[float] = None,
                    shared: Optional[Dict[str, torch.Tensor]] = None):
        """Adapt ``(T, M, D)`` particles and, with ``shared_step_size``, the model's shared
        parameters (one copy per task: ``shared``, default the module's own, expanded).

        :returns: ``(particles, shared)``, ``shared`` the per-task parameters ``{name:
            (T, *shape)}`` or ``None`` when the shared parameters are not adapted; evaluate
            the adapted model with ``self.potential.with_parameters(shared)``."""
        if self.shared_step_size is None:
            return self.adapt_particles(particles, data, num_steps, callback=callback,
                                        step_size=step_size), None
        if shared is None:
            shared = {name: p.unsqueeze(0).expand(particles.size(0), *p.shape)
                      for name, p in self.model.named_parameters()}
        create_graph = torch.is_grad_enabled()
        for step in range(num_steps):
            phi = {k: v if v.requires_grad and create_graph else v.detach().requires_grad_(True)
                   for k, v in shared.items()}

            def each(k, p, lp, g, step=step):  # one step at a time: renumber, one final call
                if k == 0 or step == num_steps - 1:
                    callback(step + k, p, lp, g)

            with self.adapted_model(phi) as view:  # this step's shared parameters
                with torch.enable_grad():
                    loss = -view.log_likelihood(particles, *data).mean((-1, -2)).sum()
                    grads = torch.autograd.grad(loss, list(phi.values()), create_graph=create_graph)
                particles = self.adapt_particles(particles, data, 1, step_size=step_size,
                                                 callback=None if callback is None else each)
            shared = {k: p - self.shared_step_size * g for (k, p), g in zip(phi.items(), grads)}
            if not create_graph:
                shared = _detached(shared)
        if num_steps == 0 and callback is not None:
            self.adapt_particles(particles, data, 0, callback=callback)
        return particles, shared

    def adapt_on(self, batch, phase: str, particles: torch.Tensor, num_steps: int,
                 shared: Optional[Dict[str, torch.Tensor]] = None,
                 step_size: Optional[float] = None):
        """:meth:`adapt_state` on a batch's ``phase`` data (``"support"`` for the chaser and
        the adapted particles, ``"leader"`` for the leader), with the learner's step or
        ``step_size`` (see :meth:`_step`). A batch whose data depend on the particles
        (``resample_each_step``, e.g. rollouts of the policies in meta-RL) is asked for fresh
        data from the current particles before every step."""
        if not getattr(batch, "resample_each_step", False):
            return self.adapt_state(particles, batch.adaptation_data(phase, particles),
                                    num_steps, step_size=step_size, shared=shared)
        for _ in range(num_steps):
            data = batch.adaptation_data(phase, particles.detach())
            particles, shared = self.adapt_state(particles, data, 1, step_size=step_size,
                                                 shared=shared)
        return particles, shared

    @contextlib.contextmanager
    def adapted_model(self, shared: Optional[Dict[str, torch.Tensor]]):
        """Within the block, ``self.potential`` evaluates the model with the per-task
        shared parameters ``shared`` from :meth:`adapt_state` (nothing changes for ``None``)."""
        base = self.potential
        self.potential = base.with_parameters(shared) if shared is not None else base
        try:
            yield self.potential
        finally:
            self.potential = base

    def _expand(self, num_tasks: int) -> torch.Tensor:
        return self.theta0.unsqueeze(0).expand(num_tasks, -1, -1)

    def _step(self, step_size: Optional[float] = None):
        """The adaptation step: a float, or per-coordinate ``(D,)`` sizes; ``step_size``
        replaces the learner's and scales the noise coordinates' step alike."""
        scale = 1.0 if step_size is None else check_positive_float("step_size", step_size) / self.step_size
        if self.noise_step_size is None and not self.log_step_size.numel():
            return scale * self.step_size
        return scale * self.step_sizes

    @property
    def initial_noise_in_graph(self) -> bool:
        """Whether ``theta0``'s noise coordinates keep their graph for a meta-loss term other
        than the chaser's to train them (BMAML's step objective ``"query_nll"``)."""
        return False

    def _initial_for_adaptation(self, num_tasks: int) -> torch.Tensor:
        """``theta0`` expanded to ``(T, M, D)``. Its noise coordinates are cut from the graph
        here (so the meta-loss of the adapted particles never reaches them) with
        ``calibration="initial_noise"`` (the calibration term trains them) or
        ``chaser_trains_noise=False``, unless ``initial_noise_in_graph`` (another term of the
        meta-loss routes its own gradient to them, see BMAML's ``step_size_objective``)."""
        theta = self.theta0
        if self.calibration == "initial_noise" or not (self.chaser_trains_noise
                                                       or self.initial_noise_in_graph):
            theta = torch.where(self.noise_mask, theta.detach(), theta)
        return theta.unsqueeze(0).expand(num_tasks, -1, -1)

    def calibrate(self, particles: torch.Tensor) -> torch.Tensor:
        """Adapted particles with the meta-learned noise offset added to their noise
        coordinates (unchanged unless ``calibration="noise_offset"``); with
        ``noise_adaptation_scale`` the noise coordinates' change from ``theta0`` is first
        scaled by the meta-learned :math:`e^s`."""
        if not self.noise_offset.numel():
            return particles
        if self.noise_log_scale.numel():  # theta0 + e^s (theta - theta0) on the noise columns
            base = self.theta0.detach().to(particles.dtype)
            scale = particles.new_ones(particles.shape[-1]).masked_scatter(
                self.noise_mask, self.noise_log_scale.to(particles.dtype).exp())
            particles = base + (particles - base) * scale
        offset = self.noise_offset.to(particles.dtype)
        shift = particles.new_zeros(offset.shape[:-1] + particles.shape[-1:])
        shift = shift.masked_scatter(self.noise_mask.expand_as(shift), offset)
        return particles + shift

    def mixture_nll(self, particles: torch.Tensor, *data) -> torch.Tensor:
        """Negative log of the particle mixture's predictive density, per point: ``(T, N)``
        (``data``: the model's arguments, e.g. ``x, y``)."""
        return -mixture_log_likelihood(self.potential.log_likelihood(particles, *data))

    def calibration_loss(self, adapted: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
        """The query mixture NLL per point that meta-learns the noise. Its gradient reaches
        the noise offset (``"noise_offset"``) or, first order (identity Jacobian through the
        adaptation), the noise coordinates of ``theta0`` (``"initial_noise"``); nothing else."""
        if self.calibration == "noise_offset":
            particles = self.calibrate(adapted.detach())
        else:
            shift = self.noise_mask * (self.theta0 - self.theta0.detach())  # zero, carries grad
            particles = adapted.detach() + shift
        return self.mixture_nll(particles, *batch.adaptation_data("query", particles)).mean()

    def temperature_loss(self, adapted: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
        """The tempered query mixture NLL per point that meta-learns the predictive
        temperature (``learn_predictive_temperature``); the adapted particles are cut from
        the graph, so only the temperature learns from it."""
        particles = self.calibrate(adapted.detach()).detach()
        x, y, *rest = batch.adaptation_data("query", particles)
        log_lik = self.potential.support_log_likelihood(particles, x, *rest)
        log_probs = tempered_log_predictive(log_lik, self.log_predictive_temperature.exp().squeeze(0))
        return -support_log_density(log_probs, y, self.potential.observation_support).mean()

    def add_calibration_loss(self, loss: torch.Tensor, adapted: torch.Tensor,
                             batch: TaskBatch,
                             calibration_batch: Optional[TaskBatch] = None,
                             shared: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """``loss`` plus the calibration term when the learner has one (logged as
        ``loss_terms["calibration_nll"]``). With ``calibration_batch`` (held-out tasks) the
        term is computed on those tasks, adapted from ``theta0`` without a graph, instead of
        on the training batch's ``adapted`` particles (and adapted ``shared`` parameters)."""
        tempered = bool(self.log_predictive_temperature.numel())
        if not (self.has_calibration_term or tempered):
            return loss
        if calibration_batch is not None:
            batch = self.check_tasks(calibration_batch)
            with torch.no_grad():
                adapted, shared = self.adapt_on(batch, "support",
                                                self._expand(batch.num_tasks).detach(),
                                                self.inner_steps)
        with self.adapted_model(_detached(shared)):
            if self.has_calibration_term:
                term = self.calibration_loss(adapted, batch)
                self.loss_terms["calibration_nll"] = term.detach()
                loss = loss + term
            if tempered:
                term = self.temperature_loss(adapted, batch)
                self.loss_terms["temperature_nll"] = term.detach()
                loss = loss + term
        return loss

    @property
    def adapt_steps(self) -> int:
        """The adaptation's step count at test time (:meth:`adapt`'s default): the count
        :meth:`select_adapt_steps` chose (``fit`` calls it at the end of training), else
        ``inner_steps``. Assignable (an int >= 0, or ``None`` to go back to ``inner_steps``)."""
        chosen = int(self.selected_steps)
        return self.inner_steps if chosen < 0 else chosen

    @adapt_steps.setter
    def adapt_steps(self, value: Optional[int]) -> None:
        self.selected_steps.fill_(-1 if value is None else check_int("adapt_steps", value, 0))

    def select_adapt_steps(self, tasks: TaskBatch, candidates: Optional[Sequence[int]] = None,
                           chunk: int = 200) -> Dict[str, list]:
        r"""Choose the adaptation's step count at test time on held-out tasks, by their
        query mixture NLL (a proper scoring rule), and keep it as :attr:`adapt_steps`.

        Meta-training backpropagates through ``inner_steps`` steps; adapting a new task
        needs no meta-gradient, so more steps cost little there. How far the particles
        should travel from ``theta0`` is the family's: a few steps from ``theta0`` stop short
        of the posterior (on the families suite's Normal-Gamma lines, three steps close
        0.36 of the NLL gap, ten steps 0.85), and every step past the best goes back toward
        the model's own broad prior, the target of the steps (early stopping is what keeps
        the learned prior in the posterior, Grant et al. 2018). Each count of
        ``candidates`` (default ``inner_steps`` times 1, 2, 3, 5 and 10) adapts the tasks
        from ``theta0``, ``chunk`` tasks at a time; the chosen count is the one with the
        lowest mean NLL per task (the first on a tie). The one-standard-error rule (the
        smallest count within one paired s.e. of the lowest) was tried and not kept: on
        the Student-t family (seed 2, 200 selection tasks) it kept three steps (0.906
        against six steps' 0.901 +- 0.016), where on the 200 evaluation tasks six close
        0.83 of the NLL gap and three 0.62: heavy-tailed task NLLs make the s.e. wide
        and the rule too timid; ``fit`` gives it 1,000 tasks instead.

        With a learned predictive temperature (``learn_predictive_temperature``) each count
        is scored at its own best temperature, fitted on the same tasks (temperature
        scaling on held-out data, Guo et al. 2017), and the chosen count's temperature
        replaces the meta-trained one: that one was fitted for ``inner_steps`` steps, and
        on digits (1-shot, BFA, seed 0) it over-sharpened the ten steps chosen with it
        (ECE 0.115 against 0.017 at one step).

        :param tasks: held-out tasks (a :class:`TaskBatch`; e.g. ``source.sample(200, g)``),
            not the ones meta-trained on when the source is a finite pool.
        :param chunk: tasks adapted at once (memory).
        :returns: ``{"steps": [...], "nll": [...], "se": [...], "chosen": n, "diverged":
            [...]}`` (and ``"temperature": [...]``, each count's fitted temperature, with a
            learned one): per count the mean query NLL per point and task, and the standard
            error of its paired difference to the lowest (0 at the lowest); the counts whose
            adaptation took a non-finite step (``inf``, never chosen: on the digits MLP
            with every weight latent and learned steps, ten steps diverged on 5-shot).
        """
        chunk = check_int("chunk", chunk, 1)
        tasks = self.check_tasks(tasks)
        if not isinstance(tasks, TaskBatch):
            raise TypeError(f"tasks must be a TaskBatch with query sets to score, got "
                            f"{type(tasks).__name__}")
        if tasks.num_tasks < 2:
            raise ValueError(f"tasks must hold at least 2 tasks (a standard error), got "
                             f"{tasks.num_tasks}")
        if candidates is None:
            candidates = [self.inner_steps * m for m in (1, 2, 3, 5, 10)]
        if not isinstance(candidates, (list, tuple)) or not candidates:
            raise TypeError(f"candidates must be a non-empty list of step counts, got {candidates!r}")
        steps = sorted({check_int("candidates", c, 0) for c in candidates})
        per_task, diverged, temperatures = [], [], []
        for n in steps:
            if not diverged:  # a longer adaptation repeats the steps that diverged
                try:
                    nll, log_t = self._query_nll_per_task(tasks, n, chunk)
                    per_task.append(nll)
                    temperatures.append(log_t)
                    continue
                except FloatingPointError:  # a step the adaptation cannot take
                    pass
            diverged.append(n)
            per_task.append(torch.full((tasks.num_tasks,), math.inf, dtype=torch.float64))
            temperatures.append(None)
        nll = [float(v.mean()) for v in per_task]
        finite = [i for i, v in enumerate(nll) if math.isfinite(v)]
        if not finite:
            raise FloatingPointError(f"every candidate step count {steps} gave a non-finite "
                                     "query NLL")
        best = min(finite, key=lambda i: nll[i])
        se = [float((v - per_task[best]).std() / math.sqrt(v.numel())) for v in per_task]
        chosen = steps[best]
        self.adapt_steps = chosen
        out = {"steps": steps, "nll": nll, "se": se, "chosen": chosen, "diverged": diverged}
        if self.log_predictive_temperature.numel():
            with torch.no_grad():
                self.log_predictive_temperature.fill_(temperatures[best])
            out["temperature"] = [None if t is None else math.exp(t) for t in temperatures]
        return out

    def _query_nll_per_task(self, tasks: TaskBatch, num_steps: int, chunk: int):
        """``((T,), log_t)``: the query mixture NLL per point of each task adapted
        ``num_steps`` steps from ``theta0``, ``chunk`` tasks at a time (float64), and, with a
        learned predictive temperature, the log-temperature that minimises their mean,
        at which the NLLs are taken (else ``None``)."""
        tempered = bool(self.log_predictive_temperature.numel())
        parts = []
        for start in range(0, tasks.num_tasks, chunk):
            part = tasks[start:start + chunk]
            posterior = self.adapt(part.x_support, part.y_support, num_steps=num_steps)
            if tempered:  # every value's log likelihood, to refit the temperature
                with torch.no_grad():
                    log_lik = posterior.potential.support_log_likelihood(posterior.particles,
                                                                        part.x_query)
                parts.append((log_lik.double(), part.y_query))
            else:
                parts.append(-posterior.log_predictive_density(part.x_query, part.y_query)
                             .double().mean(-1))
        if not tempered:
            return torch.cat(parts), None
        if not all(bool(torch.isfinite(ll).all()) for ll, _ in parts):
            raise FloatingPointError(f"{num_steps} steps gave a non-finite log likelihood")
        support = self.potential.observation_support
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)

        def per_task():  # T within [1e-2, 1e2]: past it the predictive is one-hot or uniform
            t = log_t.clamp(-LOG_TEMPERATURE_BOUND, LOG_TEMPERATURE_BOUND).exp()
            return torch.cat([-support_log_density(tempered_log_predictive(ll, t), y,
                                                   support).mean(-1) for ll, y in parts])

        opt = torch.optim.LBFGS([log_t], max_iter=100, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = per_task().mean()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        with torch.no_grad():
            return per_task(), float(log_t.clamp(-LOG_TEMPERATURE_BOUND, LOG_TEMPERATURE_BOUND))

    def check_tasks(self, tasks):
        """Validate a batch of tasks (:meth:`TaskBatch.validate`) and check it against the
        model's example task: inputs ``(T, K, *input_shape)`` in the particles' dtype,
        targets ``(T, K, *target_shape)``; raises naming the field. Other batch protocols
        (e.g. meta-RL's rollouts) validate themselves."""
        tasks = tasks.validate()
        if not isinstance(tasks, TaskBatch):
            return tasks
        for name in tasks._fields:
            t = getattr(tasks, name)
            shape = self.input_shape if name.startswith("x") else self.target_shape
            if shape is not None and tuple(t.shape[2:]) != shape:
                raise ValueError(
                    f"{name} must have shape (T, K, *{shape}) like the model's example task, "
                    f"got {tuple(t.shape)}")
            if name.startswith("x") and t.dtype != self.theta0.dtype:
                raise TypeError(f"{name} is {t.dtype} but the particles are {self.theta0.dtype}: "
                                f"cast the tasks (e.g. tasks.to({self.theta0.dtype}))")
        return tasks

    def _check_xy(self, x, y):
        """``(x, y, batched)``: one task ``(N, *input_shape)``, ``(N, *target_shape)`` or
        ``T`` tasks with a leading task dim; raise naming the shapes otherwise."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating torch.Tensor, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        if not isinstance(y, torch.Tensor) or y.dtype == torch.bool or y.is_complex():
            raise TypeError(f"y must be a floating or integer torch.Tensor, got "
                            f"{y.dtype if isinstance(y, torch.Tensor) else type(y).__name__}")
        for name, t in (("x", x), ("y", y)):
            check_has_data(name, t)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains non-finite values (NaN or inf)")
        inp, tgt = self.input_shape, self.target_shape
        if inp == (1,) and x.dim() == y.dim() and x.dim() in (1, 2) and tgt == ():
            x = x.unsqueeze(-1)  # 1-D inputs given as (N,) or (T, N)
        batched = x.dim() == len(inp) + 2 if inp is not None else x.dim() == 3
        expected = "(N, *input_shape) or (T, N, *input_shape)"
        ok = inp is None or (tuple(x.shape[x.dim() - len(inp):]) == inp
                             and x.dim() in (len(inp) + 1, len(inp) + 2))
        lead = x.shape[: 2 if batched else 1]
        if ok and tgt is not None:
            ok = tuple(y.shape) == tuple(lead) + tgt
        if not ok:
            raise ValueError(
                f"x must be {expected} and y the same leading dims + target_shape, with "
                f"input_shape={inp} and target_shape={tgt} (from the model's example task); "
                f"got x {tuple(x.shape)} and y {tuple(y.shape)}")
        if x.size(1 if batched else 0) == 0:
            raise ValueError(f"x has no points (the support set is empty: x {tuple(x.shape)})")
        return x, y, batched

    def adapt(
        self, x: torch.Tensor, y: torch.Tensor, num_steps: Optional[int] = None,
        track_ksd: bool = False, step_size: Optional[float] = None,
    ) -> ParticlePosterior:
        """Adapt the learned prior to a task's support set; returns its particle posterior.

        :param x: ``(K, *input_shape)`` (``(K,)`` for 1-D inputs), or ``(T, K, ...)`` for T
            tasks at once (moved to the learner's device, as ``y``).
        :param y: ``(K, *target_shape)`` or ``(T, K, ...)``.
        :param num_steps: adaptation steps (default: :attr:`adapt_steps`, the count ``fit``
            chose on held-out tasks, else ``inner_steps``).
        :param track_ksd: record the squared kernelized Stein discrepancy (IMQ, V-statistic)
            to each task's posterior before every step and after the last, in
            ``posterior.info["ksd"]`` of shape ``(steps + 1, T)`` (or ``(steps + 1,)``).
        :param step_size: adaptation step size (default: the learner's meta-trained one),
            e.g. smaller when adapting on many more points than the learner was trained on.
        """
        x, y, batched = self._check_xy(x, y)
        x, y = x.to(self.theta0.device), y.to(self.theta0.device)  # data go to the learner
        steps = self.adapt_steps if num_steps is None else check_int("num_steps", num_steps, 0)
        single = not batched
        xb, yb = (x[None], y[None]) if single else (x, y)
        recorded, scores = [], []

        def record(step, p, log_p, grad):  # the step's scores are reused for the KSD
            recorded.append(p.detach())
            scores.append(None if grad is None else grad.detach())

        callback = record if track_ksd else None
        with torch.no_grad():
            adapted, shared = self.adapt_state(self._expand(xb.size(0)).detach(), (xb, yb),
                                               steps, callback=callback, step_size=step_size)
            particles = self.calibrate(adapted)
        potential = self.potential.with_parameters(shared) if shared is not None else self.potential
        particles = particles[0] if single else particles
        if single:
            potential = potential.task_view(0)
        info = self.describe(steps)
        if step_size is not None:
            info["step_size"] = step_size
        info["initial_particles"] = self.theta0.detach().clone()
        if track_ksd:
            values = ksd_trajectory(self.potential, recorded, xb, yb,
                                    scores_per_step=scores)  # (steps + 1, T)
            info["ksd"] = values[:, 0] if single else values
        return ParticlePosterior(potential, particles, x, y, info=info,
                                 temperature=self.predictive_temperature)

    def describe(self, steps: Optional[int] = None) -> dict:
        """Attributes for diagnostics and checkpoints."""
        info = {
            "inference_method": self.method,
            "num_particles": self.num_particles,
            "num_steps": self.inner_steps if steps is None else steps,
            "step_size": self.step_size,
            "calibration": self.calibration,
            "noise_sites": ",".join(self.noise_sites),
        }
        if self.noise_step_size is not None:
            info["noise_step_size"] = self.noise_step_size
        if self.shared_step_size is not None:
            info["shared_step_size"] = self.shared_step_size
        if self.noise_offset.numel():
            info["noise_offset"] = ",".join(f"{v:.6g}" for v in self.noise_offset.flatten().tolist())
        if self.noise_log_scale.numel():
            info["noise_log_scale"] = ",".join(f"{v:.6g}" for v in self.noise_log_scale.tolist())
        if self.log_step_size.numel():
            info["learned_step_sizes"] = ",".join(
                f"{k}={v:.6g}" for k, v in self.learned_step_sizes().items())
        if self.log_predictive_temperature.numel():
            info["predictive_temperature"] = self.predictive_temperature
        if self.learned_prior is not None:
            info["learn_prior"] = self.learn_prior
        if int(self.selected_steps) >= 0:
            info["adapt_steps"] = self.adapt_steps
        return info

    def config(self) -> dict:
        """The learner's full configuration (what :meth:`describe` says minus the learned
        values, plus the model's latent sites and shapes): recorded in checkpoints and
        checked on resume and :meth:`load_checkpoint`."""
        info = {k: v for k, v in self.describe().items()
                if k not in ("noise_offset", "noise_log_scale", "learned_step_sizes",
                             "adapt_steps", "predictive_temperature")}
        info.update(
            sites={s.name: list(s.shape) for s in self.potential.sites},
            dim=self.potential.dim, calibration_lr=self.calibration_lr,
            chaser_trains_noise=self.chaser_trains_noise,
            offset_per_particle=self.offset_per_particle,
            noise_adaptation_scale=self.noise_adaptation_scale,
            shared_parameters=[list(p.shape) for p in self.shared_parameters],
            shared_step_size=self.shared_step_size, learn_step_size=self.learn_step_size,
            step_size_lr=self.step_size_lr)
        if self.learn_predictive_temperature:  # (absent when off: older checkpoints match)
            info["learn_predictive_temperature"] = True
        if self.learned_prior is not None:
            info["prior_lr"] = self.prior_lr
        return info

    def prior_particles(self) -> Dict[str, torch.Tensor]:
        """The meta-learned prior: ``theta0`` as named constrained site values, each with a
        leading particle dim M (e.g. ``noise_precision`` as a precision, not its log)."""
        return {k: v.detach() for k, v in self.potential.unpack(self.theta0).items()}

    def prior_distribution(self, bandwidth="scott", tasks: Optional[TaskBatch] = None,
                           form: str = "auto", **fit_options):
        r"""The meta-learned prior as a :mod:`pyro.distributions` object over the flat
        unconstrained vector, for other inference on a new task (see
        :meth:`model_with_learned_prior`).

        :param tasks: ``None``: with ``learn_prior``, the learned Gaussian
            (``form="learned"``); otherwise a Gaussian kernel-density mixture of the M
            initial particles ``theta0`` (:func:`~pyro_bmaml.engine.posterior.particle_prior`, which documents
            ``bandwidth``). A :class:`TaskBatch` of the family's tasks (e.g.
            ``source.sample(200, generator)``): a prior estimated from them, as ``form``
            says. ``theta0`` is where a few SVGD steps start, not a sample of the family's
            parameters, and under its mixture NUTS does worse than under the broad prior
            (``results/families.md``): give tasks.
        :param form: with tasks, ``"empirical_bayes"``: the Gaussian that maximises the
            tasks' marginal likelihood, importance-sampled with proposals at the particles
            adapted to each task
            (:func:`~pyro_bmaml.engine.empirical_bayes.empirical_bayes_prior`;
            ``fit_options`` go to it; the fit's diagnostics are kept as
            ``self.prior_fit``); or ``"kde"``: the *aggregate posterior*, the adapted
            (calibrated) particles pooled over the tasks as a kernel-density mixture.
            ``"auto"``: the first up to D = 64 coordinates, the second above (importance
            sampling of a task's evidence degenerates in the thousands of coordinates of a
            neural network). The aggregate posterior is the task prior only when each
            task's posterior is exact under the true prior; a few SVGD steps from the
            model's broad prior leave it the prior convolved with each task's estimation
            error, too wide: on the families suite's regression families NUTS under it
            closed less of the gap to the Bayes-optimal predictive than under the
            empirical-Bayes Gaussian (``results/families.md``).
        """
        if form == "learned" or (form == "auto" and tasks is None
                                 and self.learned_prior is not None):
            if self.learned_prior is None:
                raise ValueError("form='learned' is the prior learned with learn_prior=..., "
                                 "and this learner has none")
            return self.learned_prior.distribution()
        if tasks is None:
            if form not in ("auto", "kde"):
                raise ValueError(f"form={form!r} needs tasks; without them the prior is "
                                 f"theta0's kernel-density mixture (form='kde')")
            return particle_prior(self.theta0, bandwidth)
        if not isinstance(tasks, TaskBatch):
            raise TypeError(f"tasks must be a TaskBatch of the family's tasks, got "
                            f"{type(tasks).__name__}")
        form = check_choice("form", form, ("auto", "empirical_bayes", "kde", "learned"))
        if form == "auto":
            form = "empirical_bayes" if self.potential.dim <= 64 else "kde"
        tasks = tasks.validate()
        adapted = self.adapt(tasks.x_support, tasks.y_support).particles
        if form == "kde":
            return particle_prior(adapted.reshape(-1, adapted.size(-1)), bandwidth)
        if self.shared_step_size is not None:
            raise ValueError("form='empirical_bayes' needs a model whose likelihood is the "
                             "same for every task; this learner adapts the model's shared "
                             "parameters per task (shared_step_size): use form='kde'")
        self.prior_fit = empirical_bayes_prior(self.potential, adapted,
                                               (tasks.x_support, tasks.y_support), **fit_options)
        return self.prior_fit.prior

    def model_with_learned_prior(self, bandwidth="scott", site: str = "theta",
                                 tasks: Optional[TaskBatch] = None, form: str = "auto",
                                 **fit_options):
        """The task model with the meta-learned prior in place of its own priors, for any
        Pyro inference on a new task, e.g. ``NUTS(learner.model_with_learned_prior(tasks=
        source.sample(200, generator)))``; posterior samples of ``site`` map to named sites
        with ``learner.potential.unpack`` (see
        :func:`~pyro_bmaml.engine.posterior.model_with_prior`). ``tasks``, ``form`` and
        ``fit_options``: see :meth:`prior_distribution` (give tasks)."""
        prior = self.prior_distribution(bandwidth, tasks, form, **fit_options)
        return model_with_prior(self.potential, prior, site)

    def load_checkpoint(self, path) -> dict:
        """Load the learned state a :func:`~pyro_bmaml.meta.training.fit` checkpoint holds into
        this learner, built with the same configuration (else ``ValueError`` naming the
        differences). Returns the checkpoint (history, iteration, ...)."""
        from .checkpoint import load_checkpoint
        from .training import check_config

        state = load_checkpoint(path)
        check_config(state, {"learner": self.config()}, path, keys=("learner",))
        self.load_state_dict(state["learner"])
        return state

    def forward(self, batch: TaskBatch,
                calibration_batch: Optional[TaskBatch] = None) -> torch.Tensor:
        """``learner(batch)`` is the meta-loss (so ``torch.func.functional_call`` works)."""
        return self.meta_loss(batch, calibration_batch)

    def _is_policy(self) -> bool:
        return bool(self.potential.observation_factor and hasattr(self.model, "distribution"))

    def _require_policy(self) -> None:
        if not self._is_policy():
            raise ValueError(
                "the trust-region meta-update needs a policy: a model whose data are a "
                "pyro.factor of weighted actions and that has a "
                "distribution(weights, observations) method, e.g. GaussianMLPPolicy")

    def policy_trust_region(self, batch, loss_of: Callable):
        r"""``(loss_fn, kl_fn)`` of a trust-region meta-update on a policy: a model whose data
        are a ``pyro.factor`` of weighted actions and that has a
        ``distribution(weights, observations)`` method (e.g.
        :class:`~pyro_bmaml.tasks.models.GaussianMLPPolicy`).

        The data are drawn once: support rollouts of the initial policies, then query
        rollouts of the policies adapted on them, :math:`\theta'_{old}`. ``adapted()``
        re-runs the adaptation from ``theta0`` on the same support data, so that
        :math:`\theta'` moves with ``theta0``; ``kl_fn`` is the mean
        :math:`\mathrm{KL}(\pi_{\theta'_{old}}(\cdot \mid s) \,\|\, \pi_{\theta'}(\cdot
        \mid s))` over the query states, and ``loss_fn = loss_of(adapted, old, old_policy,
        query)`` the method's meta-loss (``old``: the adapted particles :math:`\theta'_{old}`;
        ``query``: observations, actions, advantages).
        """
        self._require_policy()
        tasks = batch.num_tasks
        support = batch.adaptation_data("support", self._initial_for_adaptation(tasks).detach())

        def adapted():
            return self.adapt_particles(self._initial_for_adaptation(tasks), support,
                                        self.inner_steps)

        with torch.no_grad():
            old = adapted()
        query = tuple(getattr(q, "tensor", q) for q in batch.adaptation_data("query", old))
        old_policy = self.model.distribution(self.potential.unpack(old), query[0])

        def kl_fn():
            new = self.model.distribution(self.potential.unpack(adapted()), query[0])
            return torch.distributions.kl_divergence(old_policy, new).mean()

        return loss_of(adapted, old, old_policy, query), kl_fn

    def policy_surrogate(self, adapted, old, old_policy, query):
        r"""MAML-RL's post-update loss for :meth:`policy_trust_region`: the
        importance-weighted surrogate :math:`-\frac1{TMN} \sum \frac{\pi_{\theta'}(a \mid
        s)}{\pi_{\theta'_{old}}(a \mid s)} A` on the query rollouts of the adapted policies
        (Finn et al. 2017; Schulman et al. 2015), every particle's its own."""
        observations, actions, advantages = query
        old_log_prob = old_policy.log_prob(actions)

        def loss_fn():
            new = self.model.distribution(self.potential.unpack(adapted()), observations)
            return -(torch.exp(new.log_prob(actions) - old_log_prob) * advantages).mean()

        return loss_fn

    def fit(self, tasks, num_iterations: int, **kwargs):
        """Meta-train on a task source (Adam on ``theta0``, the noise calibration and the
        model's shared parameters); returns the history. The full argument list is
        :func:`pyro_bmaml.meta.training.fit`'s; the common ones:

        - ``tasks``: a task source, ``sample(batch_size, generator) -> TaskBatch``
          (:class:`~pyro_bmaml.tasks.base.Sinusoid`, :class:`~pyro_bmaml.tasks.base.TaskPool` of your
          own tensors, :class:`~pyro_bmaml.tasks.fewshot.FewShotClassification`);
        - ``meta_batch_size`` (10), ``lr`` (1e-3), ``schedule_iterations`` (the nominal
          budget the x0.98 decay is spread over; default ``num_iterations``);
        - ``eval_tasks``, ``eval_every``: held-out tasks scored along the way (``metrics``:
          the family's scores, default the task source's ``metrics`` or regression's);
        - ``calibration_tasks``: held-out tasks on which the noise offset is learned;
        - ``checkpoint``, ``checkpoint_every``, ``resume``: atomic checkpoints recording
          the configuration; an existing one is resumed (same settings only);
        - ``select_steps`` (default ``True``): end by choosing the adaptation's step count
          at test time on held-out tasks (:meth:`select_adapt_steps`, :attr:`adapt_steps`);
        - ``seed``, ``progress``.

        Raises ``FloatingPointError`` naming the meta-iteration and the likely cause when
        the adaptation or the meta-update becomes non-finite (nothing bad is saved)."""
        from .training import fit

        return fit(self, tasks, num_iterations, **kwargs)


class BMAML(MetaLearner):
    """Bayesian MAML: SVGD adaptation from learned particles, chaser or BFA meta-loss.

    :param kernel: a Stein kernel (default :class:`RBFSteinKernel` with the paper's scalar
        median bandwidth and a stop-gradient through it).
    :param leader_steps: s, extra SVGD steps of the leader on support + query.
    :param objective: ``"chaser"`` (the paper's) or ``"bfa"``.
    :param mode: SVGD kernel mode, ``"multivariate"`` (the paper's) or ``"univariate"``.
    :param distance_sites: the latent sites whose coordinates enter the chaser distance.
        ``"auto"`` (default): the model's ``chaser_sites`` attribute when it has one, else all
        sites but the noise sites. :class:`~pyro_bmaml.tasks.models.BayesianMLP` names its network
        weights there, leaving out the precisions, as the official code does.
    :param calibration: how the noise sites are meta-learned, see the module docs: with the
        chaser objective ``"noise_offset"`` (default), ``"initial_noise"``, ``"none"``
        (official code), ``"distance"`` or ``"mixture"``; with ``"bfa"`` ``"noise_offset"``,
        ``"initial_noise"`` or ``"none"`` (BFA's query NLL reaches the steps and the
        locations of ``theta0``, not its noise coordinates, which are cut from the graph
        unless ``chaser_trains_noise``: without a calibration term its noise level is the
        initial draws'). The default is ``"noise_offset"`` for a model with noise sites;
        for a model without them, ``"mixture"`` with the chaser objective (see the module
        docs: the chaser distance alone keeps sharpening a classifier) and ``"none"`` with
        BFA (whose loss is that term); ``"none"`` with BFA on a policy.
    :param calibration_weight: the noise sites' weight in the chaser distance
        (``"distance"``; default 1) or the weight of the BFA term, the query mixture NLL
        summed over points (``"mixture"``); ``None`` (default) with ``"mixture"``: the
        query mixture NLL per point (averaged over points and tasks), so that the term's
        scale does not grow with the number of query points. Measured on the suite's
        classification families, 3 seeds: per point, the N-way family closes 0.36 / 0.32 of
        the gap at lr 1e-2 / 5e-2 (ECE 0.031 / 0.041), the logistic one 0.96 / 0.99; summed
        (weight 1), 0.30 / 0.33 (ECE 0.065 / 0.030) and 0.85 / 0.98: BFA's sum outweighs the
        chaser distance and trains as slowly as BFA at the lower rate.
    :param temperature: scale of the kernel's repulsion in the adaptation steps (1: SVGD;
        SVPG's temperature for meta-RL). Default: the model's ``temperature`` attribute
        (:class:`~pyro_bmaml.tasks.models.GaussianMLPPolicy` scales its prior by it), else 1.
    :param step_size_objective: what trains the learned steps (``learn_step_size``) with the
        chaser objective: ``"query_nll"`` (the chaser particles' calibrated query mixture NLL
        per point, a proper scoring rule; it also trains ``theta0``'s noise coordinates, whose
        precision scales every SVGD step of its particle and which the chaser distance never
        reaches with ``chaser_trains_noise=False``; the rest of ``theta0`` follows the chaser
        distance alone), ``"chaser"`` (the chaser distance, like ``theta0``; the initial noise
        stays where it started) or ``"auto"`` (default: ``"query_nll"``, and ``"chaser"`` on a
        policy, whose rollouts have no NLL, and with ``compile=True``, whose compiled steps'
        backward runs once: Inductor's backward may reuse the buffers it saved, so a second
        pass through it fails, and the query NLL's routing takes three). The leader is a
        fixed target one leader step past the chaser, so the chaser distance's gradient in a
        step moves the chaser toward it: it lengthens a step wherever the adaptation keeps
        moving one way and shortens it where it turns. On the suite's N-way family, whose softmax keeps sharpening on separable
        support points, it grew the weights' step from 0.57 after 1,000 meta-iterations to
        2.3-2.6 after 3,000, and held-out accuracy fell from 0.56 to 0.33-0.37 on all three
        seeds (``results/families_3000_chaser.md``); on sinusoid it shrank the steps 3-10x
        and cost MSE. After 3,000 iterations the query NLL kept N-way accuracy at 0.57 and
        closed as much of the gap or more on four of the five families, less on
        Normal-Gamma (-0.31 +- 0.36 against -0.22 +- 0.03;
        ``results/families_3000_query_nll.md``); after 1,000, see ``results/families.md``
        and the README. It costs two more partial backward passes per meta-step. On the
        digits MLP with every weight latent it lengthened the head's step from 0.5 to
        112-154, past the step at which the prior's pull overshoots, and all three seeds
        ended at chance (``results/fewshot_learned_steps_unbounded.md``) until the learned
        steps were bounded by the prior (``learn_step_size``).
    :param inner_steps: n, SVGD steps of the chaser (meta-training) and, until ``fit``
        chooses another count on held-out tasks (:meth:`select_adapt_steps`), of
        adaptation. Default 3: on the
        families suite (``results/families.md``) three steps lowered the held-out NLL on
        every regression family (by 0.05 to 0.18 per point) and stayed within 0.05 of one
        step on the classification families. Ten steps (``results/families_10steps.md``)
        close more of the gap on the regression families (Normal-Gamma 0.38, Student-t
        0.79 against 0.11, 0.56; Normal-Gamma's ceiling is the step count,
        ``results/families_ceilings.md``) and as much on the classification families
        (now that ``calibration="mixture"`` keeps a classifier from sharpening without
        end), but on the paper's sinusoid network held-out MSE rose over the first 300
        meta-iterations (3.41 -> 3.71; three steps: 3.49 -> 3.02), and every meta-step
        costs about three times as much; pass ``inner_steps=10`` for a small model whose
        noise level has to be learned from a few points. The paper's n = 1 is what the
        command line uses on sinusoid, digits and point-nav.

    :param leader_step_scale: the leader's step relative to the chaser's: a positive float,
        or ``"auto"`` (default): with learned steps (``learn_step_size``) the support's share
        of the leader's points, ``K / (K + Q)``, else 1 (the paper's one fixed step). The
        log likelihood's gradient, and its curvature, grow with the number of points: a
        step learned near the edge of stability on K support points overshoots on the
        leader's K + Q, and the chaser distance to an overshot leader is a target of
        noise. On Normal-Gamma (seed 1, 3,000 meta-iterations) the learned steps grew to
        0.03, near the edge of stability on the 3 support points and so about 4x past it on
        13, and the chaser distance read 34 and 108 at iterations 600 and 2,400 (the scaled
        leader's: 1.8 and 3.9); over the suite see the README.
    :param compile: take the SVGD steps (adaptation, chaser, leader) as compiled code
        (:mod:`pyro_bmaml.engine.compiled`: the recorded log density, its gradient and the
        SVGD direction compiled together by :func:`torch.compile`, and the meta-gradient's
        backward with them), with an exact fallback to the replayed graph and a warning where
        compiling fails. The first step of each input signature compiles (seconds to tens of
        seconds); not with the trust-region meta-update (a second derivative through the
        steps).

    Defaults that differ from the paper's configuration (M = 10, n = s = 1, a fixed
    eps = 1e-3, the chaser's gradient reaching the noise precision): ``inner_steps=3``,
    ``learn_step_size=True`` trained, with the initial noise, by the query NLL
    (``step_size_objective="auto"``),
    ``chaser_trains_noise=False``, and ``calibration="mixture"`` on a model without noise
    sites; pass ``inner_steps=1,
    learn_step_size=False, chaser_trains_noise=True, calibration="none"`` for the official
    code's learner. See :class:`MetaLearner` for the other arguments.
    """

    method = "bmaml"
    calibrations = ("noise_offset", "initial_noise", "none", "distance", "mixture")

    def __init__(
        self,
        model: Callable,
        num_particles: int = 10,
        inner_steps: int = 3,
        leader_steps: int = 1,
        step_size: float = 1e-3,
        kernel: Optional[SteinKernel] = None,
        objective: str = "chaser",
        mode: str = "multivariate",
        distance_sites: Union[str, Sequence[str]] = "auto",
        init: InitSpec = "auto",
        example_args: Optional[Sequence] = None,
        noise_sites: SiteSpec = "auto",
        calibration: Optional[str] = None,
        calibration_weight: Optional[float] = None,
        noise_step_size: Optional[float] = None,
        calibration_lr: float = 1e-2,
        offset_per_particle: bool = False,
        chaser_trains_noise: bool = False,
        noise_adaptation_scale: Optional[bool] = None,
        shared_step_size: Optional[float] = None,
        temperature: Optional[float] = None,
        learn_step_size: bool = True,
        step_size_lr: float = 1e-2,
        step_size_objective: str = "auto",
        compile: bool = False,
        leader_step_scale: Union[str, float] = "auto",
        learn_predictive_temperature: bool = False,
        learn_prior: Optional[str] = None,
        prior_lr: float = 3e-3,
    ):
        """Build the learner; the arguments are documented on the class (``help(type(self))``)."""
        num_particles = check_int("num_particles", num_particles, 2)
        #: take the SVGD steps as compiled code (see the class docs)
        self.compile = check_bool("compile", compile)
        self.objective = check_choice("objective", objective, ("chaser", "bfa"))
        super().__init__(model, num_particles, inner_steps, step_size, init, example_args,
                         noise_sites, calibration, noise_step_size, calibration_lr,
                         offset_per_particle, chaser_trains_noise, noise_adaptation_scale,
                         shared_step_size, learn_step_size, step_size_lr,
                         learn_predictive_temperature=learn_predictive_temperature,
                         learn_prior=learn_prior, prior_lr=prior_lr)
        if self.compile and self.learned_prior is not None:
            raise ValueError(
                "learn_prior adapts under a prior that is not the model's, whose log density "
                "is not recorded, so the steps cannot be compiled (and the chaser's prior is "
                "trained by the query NLL, three backward passes through the steps): build "
                "the learner with compile=False")
        if self.objective == "bfa" and self.calibration in ("distance", "mixture"):
            raise ValueError(
                f"calibration={self.calibration!r} adds to the chaser distance, which "
                f"objective='bfa' does not have; use 'noise_offset', 'initial_noise' or 'none'")
        self.calibration_weight = (None if calibration_weight is None
                                   else check_positive_float("calibration_weight", calibration_weight))
        self.step_size_objective = check_choice("step_size_objective", step_size_objective,
                                                ("auto", "query_nll", "chaser"))
        if self.step_size_objective == "auto":  # no query NLL for rollouts' weighted factor
            self.step_size_objective = ("chaser" if self._is_policy() or self.compile
                                        else "query_nll")
        elif self.step_size_objective == "query_nll" and self.compile and self.learn_step_size:
            raise ValueError(
                "step_size_objective='query_nll' takes three backward passes through the "
                "adaptation, and the compiled steps' backward runs once (Inductor reuses the "
                "buffers it saved); build the learner with compile=False or "
                "step_size_objective='chaser'")
        self.distance_sites = self._resolve_distance_sites(distance_sites)
        weights = self.potential.columns_of(self.distance_sites).to(self.theta0.dtype)
        if self.calibration == "distance":
            weights[self.noise_mask] = 1.0 if self.calibration_weight is None else self.calibration_weight
        self.register_buffer("distance_weights", weights, persistent=False)
        self.leader_steps = check_int("leader_steps", leader_steps, 1)
        if isinstance(leader_step_scale, str):
            check_choice("leader_step_scale", leader_step_scale, ("auto",))
        else:
            leader_step_scale = check_positive_float("leader_step_scale", leader_step_scale)
        self.leader_step_scale = leader_step_scale
        self.kernel = RBFSteinKernel(bandwidth="median") if kernel is None else as_differentiable_kernel(kernel)
        self.mode = check_choice("mode", mode, ("multivariate", "univariate"))
        self.temperature = check_nonnegative_float(
            "temperature", getattr(model, "temperature", 1.0) if temperature is None else temperature)

    def default_calibration(self) -> str:
        if self._is_policy():
            return "none" if self.objective == "bfa" else super().default_calibration()
        if self.objective == "chaser" and not self.noise_sites:
            return "mixture"
        return super().default_calibration()

    def _resolve_distance_sites(self, distance_sites) -> List[str]:
        names = self.potential.site_names
        if isinstance(distance_sites, str):
            check_choice("distance_sites", distance_sites, ("auto",))
            distance_sites = getattr(self.model, "chaser_sites", None)
            if distance_sites is None:
                distance_sites = [n for n in names if n not in self.noise_sites] or names
        distance_sites = list(distance_sites)
        unknown = [n for n in distance_sites if n not in names]
        if unknown or not distance_sites:
            raise ValueError(
                f"distance_sites must be a non-empty list of the model's latent sites {names}, "
                f"got unknown {unknown}" if unknown else "distance_sites must not be empty"
            )
        return distance_sites

    def adapt_particles(self, particles, data, num_steps, callback=None, step_size=None):
        return transport(
            self.target(), self.kernel, particles, *data,
            num_steps=num_steps, step_size=self._step(step_size), mode=self.mode,
            callback=callback, temperature=self.temperature,
            compile=self.compile and callback is None,
        )

    def meta_loss(self, batch: TaskBatch, calibration_batch: Optional[TaskBatch] = None):
        if self.objective == "bfa" and self._is_policy():  # before any rollout or step:
            raise ValueError(  # a mixture of signed, advantage-weighted log-probabilities
                "objective='bfa' on a policy is MAML-RL's post-update surrogate, which the "
                "trust-region meta-update takes: fit(..., meta_optimizer='trpo') (the "
                "official BMAML code's BMAMLTRPO); the predictive-mixture NLL has no "
                "meaning for rollouts")
        batch = self.check_tasks(batch)
        chaser, shared = self.adapt_on(batch, "support",
                                       self._initial_for_adaptation(batch.num_tasks),
                                       self.inner_steps)
        if self.objective == "bfa":
            with self.adapted_model(shared):
                loss = self.bfa_loss(chaser, batch)
            self.loss_terms = {"bfa": loss.detach()}
            return self.add_calibration_loss(loss, chaser, batch, calibration_batch, shared)
        with torch.no_grad():  # the leader is a target: no graph, stop-gradient
            leader, _ = self.adapt_on(batch, "leader", chaser.detach(), self.leader_steps,
                                      step_size=self.leader_step_size(batch),
                                      shared=_detached(shared))
        loss = ((chaser - leader).pow(2) * self.distance_weights).sum((-1, -2)).mean()
        self.loss_terms = {"chaser": loss.detach()}
        nll = None  # the chaser's query NLL per point, when a term below needs it
        if self.calibration == "mixture":
            with self.adapted_model(shared):
                if self.calibration_weight is None:  # per point, the step objective's NLL too
                    term = nll = self._query_nll(chaser, batch)
                else:
                    term = self.calibration_weight * self.bfa_loss(chaser, batch)
            self.loss_terms["mixture_nll"] = term.detach()
            loss = loss + term
        if self.step_size_objective == "query_nll" or self.learned_prior is not None:
            loss = self._steps_by_query_nll(loss, chaser, batch, shared, nll)
        return self.add_calibration_loss(loss, chaser, batch, calibration_batch, shared)

    def leader_step_size(self, batch) -> Optional[float]:
        """The leader's adaptation step as :meth:`_step`'s ``step_size`` (``None``: the
        learner's own), from ``leader_step_scale``: the learner's steps times the scale, or,
        with ``"auto"`` and learned steps, times the support's share of the leader's points
        (``K / (K + Q)``); the learner's own steps with fixed steps (the paper's) and on a
        batch whose data depend on the particles (rollouts)."""
        scale = self.leader_step_scale
        if scale == "auto":
            if not self.log_step_size.numel() or getattr(batch, "resample_each_step", False):
                return None
            # the leader's data are the support and query points together (adaptation_data)
            support, query = (batch.adaptation_data(phase)[0] for phase in ("support", "query"))
            if not all(isinstance(a, torch.Tensor) and a.dim() >= 2 for a in (support, query)):
                return None  # no points dim to count
            scale = support.shape[1] / (support.shape[1] + query.shape[1])
        return None if scale == 1.0 else self.step_size * scale

    def trust_region_objective(self, batch):
        r"""``(loss_fn, kl_fn)`` for a trust-region meta-update on a policy (see
        :meth:`MetaLearner.policy_trust_region`), by ``objective``:

        - ``"bfa"``: MAML-RL's post-update surrogate of the SVPG-adapted particles
          (:meth:`MetaLearner.policy_surrogate`), the official BMAML RL code's ``BMAMLTRPO``;
        - ``"chaser"``: the chaser distance from the particles adapted on the fixed support
          rollouts to the leader (computed once, from the old chaser, a stop-gradient target
          as in :meth:`meta_loss`). The official code meta-trains its chaser with Adam (a
          first-order optimizer), not TRPO: a trust-region step moves to the KL boundary
          along the natural gradient, which overshoots the chaser's small distance, and on
          point navigation no step was accepted in 100 meta-iterations
          (``results/meta_rl_mamlrl_trpo.md``).

        With more than one inner step the support rollouts are the first step's for every
        step."""
        self._require_policy()
        if self.compile:
            raise ValueError("the trust-region meta-update differentiates the adaptation "
                             "twice, which compiled steps do not support; build the learner "
                             "with compile=False")
        if self.objective == "bfa":
            return self.policy_trust_region(batch, self.policy_surrogate)

        def chaser_distance(adapted, old, old_policy, query):
            with torch.no_grad():
                leader, _ = self.adapt_on(batch, "leader", old, self.leader_steps,
                                          step_size=self.leader_step_size(batch))

            def loss_fn():
                return ((adapted() - leader).pow(2) * self.distance_weights).sum((-1, -2)).mean()

            return loss_fn

        return self.policy_trust_region(batch, chaser_distance)

    @property
    def initial_noise_in_graph(self) -> bool:
        """The initial noise precision scales each particle's steps: with the query-NLL step
        objective it is trained like the steps (unless the chaser or the calibration term
        trains it)."""
        return bool(self.objective == "chaser" and self.step_size_objective == "query_nll"
                    and self.learn_step_size and self.noise_sites
                    and not self.chaser_trains_noise and self.calibration != "initial_noise")

    def _steps_by_query_nll(self, loss, chaser, batch, shared, nll=None):
        r"""``loss`` whose gradient in the learned log-steps, and in ``theta0``'s noise
        coordinates (``initial_noise_in_graph``: the initial noise precision scales every
        SVGD step of its particle, a step size of its own), is that of the chaser's query
        mixture NLL per point (calibrated) instead of the chaser distance's, and unchanged
        elsewhere: ``loss + <s - sg(s), sg(g_nll - g_loss)>``, which adds zero to the value.
        The chaser distance rewards a step that lands one SVGD step near the leader's
        stationary point; the query NLL, a proper scoring rule on held-out points, rewards
        the step that predicts best (on sinusoid the first shrank the steps 3-10x and cost
        MSE). The learned prior's parameters (``learn_prior``) are always routed so, whatever
        ``step_size_objective``: the distance alone is minimised by a prior that holds every
        particle still. ``nll``: :meth:`_query_nll` of ``chaser`` when the meta-loss already
        has it."""
        steps = (self.log_step_size,) if self.step_size_objective == "query_nll" else ()
        if self.learned_prior is not None:  # always: the distance alone would collapse it
            steps += tuple(self.learned_prior.parameters())
        routed = [(p, None) for p in steps if p.numel() and p.requires_grad]
        if self.initial_noise_in_graph and self.theta0.requires_grad:
            routed.append((self.theta0, self.noise_mask))
        if not routed or not torch.is_grad_enabled():
            return loss
        if nll is None:
            with self.adapted_model(shared):
                nll = self._query_nll(chaser, batch)
        self.loss_terms["step_nll"] = nll.detach()
        params = [param for param, _ in routed]
        g_nll, g_loss = (torch.autograd.grad(t, params, retain_graph=True, allow_unused=True)
                         for t in (nll, loss))
        for (param, mask), a, b in zip(routed, g_nll, g_loss):
            a, b = (torch.zeros_like(param) if g is None else g for g in (a, b))
            change = a - b if mask is None else (a - b) * mask
            loss = loss + ((param - param.detach()) * change.detach()).sum()
        return loss

    def _query_nll(self, chaser: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
        """The query mixture NLL per point of the calibrated ``chaser`` particles, averaged
        over points and tasks (the step objective's, and ``"mixture"``'s without a weight,
        where the calibration leaves the particles as they are)."""
        particles = self.calibrate(chaser)
        return self.mixture_nll(particles, *batch.adaptation_data("query", particles)).mean()

    def bfa_loss(self, chaser: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
        """BFA's meta-loss: the query mixture NLL summed over points, averaged over tasks."""
        return self.mixture_nll(chaser, *batch.adaptation_data("query", chaser)).sum(-1).mean()

    def describe(self, steps=None):
        info = super().describe(steps)
        if self.temperature != 1.0:
            info["temperature"] = self.temperature
        info.update(kernel=self.kernel.describe(), mode=self.mode, objective=self.objective,
                    bandwidth_rule=str(self.kernel.bandwidth_rule),
                    leader_steps=self.leader_steps, distance_sites=",".join(self.distance_sites),
                    leader_step_scale=self.leader_step_scale)
        if self.calibration in ("distance", "mixture"):
            info["calibration_weight"] = ("per point" if self.calibration_weight is None
                                          else self.calibration_weight)
        if self.log_step_size.numel() and self.objective == "chaser":
            info["step_size_objective"] = self.step_size_objective
        return info


class EMAML(MetaLearner):
    r"""Ensemble MAML: M independent MAML copies adapted from M learned initializations, no
    kernel, no interaction.

    :param objective: ``"auto"`` (default): ``"nll"`` for a likelihood over discrete values
        (classification) or a ``pyro.factor`` of weighted data (a policy's rollouts: the
        policy-gradient surrogate), else ``"mse"``. ``"mse"`` (as the papers' regression): inner steps
        :math:`\theta \leftarrow \theta - \alpha \nabla_\theta \frac1N \sum_n
        (f_\theta(x_n) - y_n)^2` on the model's predictive mean, meta-loss the query MSE
        summed over particles (the official EMAML code), averaged over tasks; ``"nll"`` (as
        the papers' classification: the cross-entropy) the same with the mean negative log
        likelihood :math:`-\frac1N \sum_n \log p(y_n \mid x_n, \theta)` in place of the
        MSE (no prior term); or
        ``"log_joint"``: gradient *ascent* on the model's log joint with step ``step_size``
        and the query NLL as meta-loss (this package's earlier baseline; its step is
        :math:`\gamma N / 2` times larger on a Gaussian likelihood of precision gamma).
    :param step_size: alpha (default 1e-3, the official EMAML's).
    :param calibration: ``"noise_offset"`` (default with ``"mse"``): the adapted noise
        coordinates get a meta-learned offset (query mixture NLL), so NLL and coverage can be
        reported; the network coordinates are untouched by it. ``"none"``: no noise learning.

    See :class:`MetaLearner` for the other arguments.
    """

    method = "emaml"

    def __init__(self, model: Callable, num_particles: int = 10, inner_steps: int = 1,
                 step_size: float = 1e-3, init: InitSpec = "auto",
                 example_args: Optional[Sequence] = None, objective: str = "auto",
                 noise_sites: SiteSpec = "auto", calibration: Optional[str] = None,
                 calibration_lr: float = 1e-2, shared_step_size: Optional[float] = None,
                 learn_step_size: bool = False, step_size_lr: float = 1e-2,
                 learn_predictive_temperature: bool = False,
                 learn_prior: Optional[str] = None, prior_lr: float = 3e-3):
        """Build the learner; the arguments are documented on the class (``help(type(self))``)."""
        self.objective = check_choice("objective", objective, ("auto", "mse", "nll", "log_joint"))
        super().__init__(model, num_particles, inner_steps, step_size, init, example_args,
                         noise_sites, calibration, calibration_lr=calibration_lr,
                         shared_step_size=shared_step_size, learn_step_size=learn_step_size,
                         step_size_lr=step_size_lr,
                         learn_predictive_temperature=learn_predictive_temperature,
                         learn_prior=learn_prior, prior_lr=prior_lr)
        if self.objective == "auto":  # no target to take a squared error to: the NLL
            self.objective = ("nll" if self.potential.observation_discrete
                              or self.potential.observation_factor else "mse")
        if self.learned_prior is not None and self.objective != "log_joint":
            raise ValueError(
                f"learn_prior learns the prior of the inner steps' log joint, and "
                f"objective={self.objective!r} steps on the {self.objective.upper()} alone "
                "(no prior): use objective='log_joint'")
        if self.objective == "log_joint" and self.calibration != "none":
            raise ValueError(
                "objective='log_joint' meta-learns the noise through its query NLL already; "
                f"calibration must be 'none', got {self.calibration!r}")

    def default_calibration(self) -> str:
        return "none" if self.objective == "log_joint" else super().default_calibration()

    def squared_error(self, particles: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean squared error of each particle's predictive mean: ``(T, M)``."""
        mean = self.potential.model_output(particles, x, y)  # (T, M, N, ...)
        return (mean - y.unsqueeze(1)).pow(2).flatten(2).mean(-1)

    def point_loss(self, particles: torch.Tensor, *data) -> torch.Tensor:
        """The objective's loss per particle, ``(T, M)``, on the model's arguments ``data``
        (``x, y``): the MSE (``"mse"``) or the mean negative log likelihood (``"nll"``) over
        the points (for a policy with per-step weights, the policy-gradient surrogate)."""
        if self.objective == "nll":
            return -self.potential.log_likelihood(particles, *data).mean(-1)
        return self.squared_error(particles, *data)

    def _inner_objective(self, theta, data, create_graph):
        """``(score, direction)``: the value logged and the ascent direction of one step."""
        if self.objective == "log_joint":
            return self.target().log_density_and_grad(theta, *data, create_graph=create_graph)
        with torch.enable_grad():
            t = theta if create_graph else theta.detach().requires_grad_(True)
            loss = self.point_loss(t, *data)
            (grad,) = torch.autograd.grad(loss.sum(), t, create_graph=create_graph)
        return -loss.detach(), -grad

    def adapt_particles(self, particles, data, num_steps, callback=None, step_size=None):
        eps = self._step(step_size)
        create_graph = torch.is_grad_enabled() and particles.requires_grad
        theta = particles if create_graph else particles.detach()
        for step in range(num_steps):
            score, direction = self._inner_objective(theta, data, create_graph)
            if value_checks_enabled() and not all_finite(score):
                raise FloatingPointError(f"gradient step {step}: the inner objective is non-finite")
            if callback is not None:  # the KSD needs the log density's score: MSE gives None
                callback(step, theta, score, direction if self.objective == "log_joint" else None)
            theta = theta + eps * direction
        if callback is not None:
            callback(num_steps, theta, None, None)
        return theta

    def meta_loss(self, batch: TaskBatch, calibration_batch: Optional[TaskBatch] = None):
        batch = self.check_tasks(batch)
        adapted, shared = self.adapt_on(batch, "support",
                                        self._initial_for_adaptation(batch.num_tasks),
                                        self.inner_steps)
        query = batch.adaptation_data("query", adapted)
        with self.adapted_model(shared):
            if self.objective == "log_joint":
                log_lik = self.potential.log_likelihood(adapted, *query)
                loss = -log_lik.mean(-1).sum(-1).mean()
                self.loss_terms = {"query_nll": loss.detach()}
                return loss
            loss = self.point_loss(adapted, *query).sum(-1).mean()
        self.loss_terms = {f"query_{self.objective}": loss.detach()}
        return self.add_calibration_loss(loss, adapted, batch, calibration_batch, shared)

    def trust_region_objective(self, batch):
        r"""``(loss_fn, kl_fn)`` for MAML-RL's trust-region meta-update
        (:class:`~pyro_bmaml.meta.trpo.TrustRegion`, ``fit(meta_optimizer="trpo")``) on a
        policy (see :meth:`MetaLearner.policy_trust_region`): ``loss_fn`` is
        :meth:`MetaLearner.policy_surrogate`, the importance-weighted surrogate on the query
        rollouts of the adapted policies."""
        self._require_policy()
        if self.objective != "nll":
            raise ValueError("the trust-region meta-update of EMAML / MAML takes the "
                             f"policy-gradient surrogate (objective 'nll'), got {self.objective!r}")

        return self.policy_trust_region(batch, self.policy_surrogate)

    def describe(self, steps=None):
        info = super().describe(steps)
        info["objective"] = self.objective
        return info


class MAML(EMAML):
    """MAML (Finn et al., 2017) on the same Pyro task model: one particle, inner steps on the
    mean squared error with Finn's alpha = 0.01 (default), query-MSE meta-loss (for a
    classifier, ``objective="auto"`` takes the cross-entropy instead, as Finn et al.).

    Equal to :class:`EMAML` with ``num_particles=1`` and the same step size. See
    :class:`EMAML` for ``objective`` and ``calibration``.
    """

    method = "maml"

    def __init__(self, model: Callable, inner_steps: int = 1, step_size: float = 1e-2,
                 init: InitSpec = "auto", example_args: Optional[Sequence] = None,
                 objective: str = "auto", noise_sites: SiteSpec = "auto",
                 calibration: Optional[str] = None, calibration_lr: float = 1e-2,
                 shared_step_size: Optional[float] = None, learn_step_size: bool = False,
                 step_size_lr: float = 1e-2, learn_predictive_temperature: bool = False,
                 learn_prior: Optional[str] = None, prior_lr: float = 3e-3):
        """Build the learner; the arguments are documented on the class (``help(type(self))``)."""
        super().__init__(model, 1, inner_steps, step_size, init, example_args, objective,
                         noise_sites, calibration, calibration_lr, shared_step_size,
                         learn_step_size, step_size_lr, learn_predictive_temperature,
                         learn_prior, prior_lr)
