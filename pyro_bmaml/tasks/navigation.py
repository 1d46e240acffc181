r"""2-D point navigation, the meta-RL benchmark of MAML (Finn et al., 2017) and BMAML.

A point starts at the origin and moves by its action each step; a task is a goal drawn
uniformly from :math:`[-r, r]^2` (``goal_range`` r = 0.5); the reward of a step is minus the
distance from the new position to the goal; actions are clipped to :math:`[-0.1, 0.1]^2`;
episodes last ``horizon`` = 100 steps.

Two settings choose between the benchmark's two public versions:

- ``action_scale`` s: the point moves by :math:`\mathrm{clip}(s\,a, -0.1, 0.1)`. With s = 1
  (default) the policy acts in the environment's units, as the public PyTorch port
  (tristandeleu/pytorch-maml-rl) does; MAML-RL's and the official BMAML code wrap the
  environment in rllab's ``normalize``, so that the policy acts in :math:`[-1, 1]` and the
  environment receives :math:`0.1\,\mathrm{clip}(a, -1, 1)`: s = 0.1. An action sd of 1 is
  then 0.1 in the environment's units, not 1 (mostly clipped, a random walk of +-0.1 steps).
- ``goal_tolerance``: MAML-RL's environment ends an episode once the point is within 0.01 of
  the goal in both coordinates (the step that arrives is rewarded, none after it); the port
  keeps the 100 steps whatever happens (default ``None``).

- :class:`PointNavigationEnv`: one task as a :class:`gymnasium.Env` (seeded, for checking
  and for users' own agents; ``pip install .[rl]`` brings gymnasium).
- :func:`rollout`: every task, particle (policy) and episode at once: one python iteration
  per time step over tensors of shape ``(T, M, B, ...)``, equal to stepping the env
  (tested).
- :func:`discounted_returns` and :func:`linear_baseline_advantages`: the returns-to-go and
  the advantages over MAML-RL's linear feature baseline (Duan et al., 2016), fit per task
  and particle by ridge regression.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import gymnasium
import numpy as np
import torch
from gymnasium import spaces

from .._checks import check_int, check_positive_float
from ..evaluation.metrics import mean_and_se

__all__ = ["PointNavigationEnv", "NavigationTasks", "NavigationBatch", "rollout",
           "discounted_returns", "linear_baseline_advantages", "sample_goals"]

MAX_ACTION = 0.1


def sample_goals(num_tasks: int, generator: torch.Generator, goal_range: float = 0.5,
                 dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``(T, 2)`` goals uniform in ``[-goal_range, goal_range]^2``."""
    num_tasks = check_int("num_tasks", num_tasks, 1)
    u = torch.rand(num_tasks, 2, generator=generator, dtype=dtype)
    return (2 * u - 1) * check_positive_float("goal_range", goal_range)


def _step(position: torch.Tensor, action: torch.Tensor, goal: torch.Tensor,
          action_scale: float = 1.0, goal_tolerance: Optional[float] = None):
    """The dynamics, reward and arrival (``goal_tolerance``; always ``False`` without one),
    shared by the env and the batched rollout."""
    position = position + (action_scale * action).clamp(-MAX_ACTION, MAX_ACTION)
    offset = position - goal
    reward = -offset.norm(dim=-1)
    if goal_tolerance is None:
        arrived = torch.zeros_like(reward, dtype=torch.bool)
    else:
        arrived = (offset.abs() < goal_tolerance).all(-1)
    return position, reward, arrived


def _check_env_settings(action_scale, goal_tolerance):
    action_scale = check_positive_float("action_scale", action_scale)
    if goal_tolerance is not None:
        goal_tolerance = check_positive_float("goal_tolerance", goal_tolerance)
    return action_scale, goal_tolerance


class PointNavigationEnv(gymnasium.Env):
    """One navigation task as a :class:`gymnasium.Env` (seeded).

    :param goal: the task's goal ``(2,)``; ``None`` draws one at each :meth:`reset` from
        the env's seeded generator (``reset(options={"goal": g})`` sets one).
    :param horizon: steps per episode (then ``truncated``).
    :param goal_range: r, goals are drawn from ``[-r, r]^2``.
    :param action_scale: s, the point moves by ``clip(s * action, -0.1, 0.1)`` (the module
        docs: 0.1 is MAML-RL's normalized action space, whose action space is then
        ``[-1, 1]^2``).
    :param goal_tolerance: end the episode (``terminated``) within this distance of the goal
        in both coordinates (MAML-RL's 0.01); ``None``: never.
    """

    metadata = {"render_modes": []}

    def __init__(self, goal=None, horizon: int = 100, goal_range: float = 0.5,
                 action_scale: float = 1.0, goal_tolerance: Optional[float] = None):
        self.horizon = check_int("horizon", horizon, 1)
        self.goal_range = check_positive_float("goal_range", goal_range)
        self.action_scale, self.goal_tolerance = _check_env_settings(action_scale, goal_tolerance)
        self.fixed_goal = None if goal is None else np.asarray(goal, dtype=np.float64)
        if self.fixed_goal is not None and self.fixed_goal.shape != (2,):
            raise ValueError(f"goal must have shape (2,), got {self.fixed_goal.shape}")
        self.observation_space = spaces.Box(-np.inf, np.inf, (2,), np.float64)
        bound = MAX_ACTION / self.action_scale
        self.action_space = spaces.Box(-bound, bound, (2,), np.float64)
        self.goal = self.fixed_goal
        self.position = np.zeros(2)
        self.steps = 0

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        if options and "goal" in options:
            self.goal = np.asarray(options["goal"], dtype=np.float64)
        elif self.fixed_goal is None:
            self.goal = self.np_random.uniform(-self.goal_range, self.goal_range, 2)
        self.position = np.zeros(2)
        self.steps = 0
        return self.position.copy(), {"goal": self.goal.copy()}

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (2,):
            raise ValueError(f"action must have shape (2,), got {action.shape}")
        if self.goal is None:
            raise RuntimeError("call reset() before step()")
        position, reward, arrived = _step(torch.from_numpy(self.position),
                                          torch.from_numpy(action), torch.from_numpy(self.goal),
                                          self.action_scale, self.goal_tolerance)
        self.position = position.numpy()
        self.steps += 1
        return (self.position.copy(), float(reward), bool(arrived), self.steps >= self.horizon,
                {})


def rollout(policy: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]],
            goals: torch.Tensor, num_particles: int, num_episodes: int,
            generator: Union[torch.Generator, Sequence[torch.Generator]],
            horizon: int = 100, action_scale: float = 1.0,
            goal_tolerance: Optional[float] = None) -> Dict[str, torch.Tensor]:
    r"""Run ``num_episodes`` episodes of every particle's policy on every task at once.

    :param policy: ``policy(observations) -> (mean, std)`` for observations of shape
        ``(T, M, B, 2)`` (each particle's own policy along dim 1), both ``(T, M, B, 2)``
        (``std`` may broadcast); the action is ``mean + std * noise``.
    :param goals: ``(T, 2)``.
    :param generator: the noise's source: one generator for every task, or a sequence of
        ``T``, one per task (each task's noise then depends on its own generator only, so
        any subset of the tasks, e.g. a process's shard, gets the same draws).
    :param action_scale, goal_tolerance: the environment's settings (the module docs).
    :returns: ``observations``, ``actions`` (the sampled, unclipped actions whose log
        probabilities the policy gradient needs; the env clips them), ``rewards``, with
        shapes ``(T, M, B, H, 2)``, ``(T, M, B, H, 2)`` and ``(T, M, B, H)``, ``alive``
        ``(T, M, B, H)`` (1 for the steps an episode took, its arriving step included, 0
        after it has ended; rewards are 0 there), and the noise used, ``noise``
        ``(H, T, M, B, 2)`` (drawn in that order from ``generator``, or ``(H, M, B, 2)``
        from each task's).
    """
    action_scale, goal_tolerance = _check_env_settings(action_scale, goal_tolerance)
    if goals.dim() != 2 or goals.size(-1) != 2:
        raise ValueError(f"goals must have shape (T, 2), got {tuple(goals.shape)}")
    m = check_int("num_particles", num_particles, 1)
    b = check_int("num_episodes", num_episodes, 1)
    h = check_int("horizon", horizon, 1)
    t = goals.size(0)
    if isinstance(generator, torch.Generator):
        noise = torch.randn(h, t, m, b, 2, generator=generator, dtype=goals.dtype)
    else:
        generators = list(generator)
        if len(generators) != t or not all(isinstance(g, torch.Generator) for g in generators):
            raise ValueError(f"generator must be a torch.Generator or a sequence of {t} (one "
                             f"per task), got {type(generator).__name__}")
        noise = torch.stack([torch.randn(h, m, b, 2, generator=g, dtype=goals.dtype)
                             for g in generators], 1)
    noise = noise.to(goals.device)
    position = goals.new_zeros(t, m, b, 2)
    goal = goals[:, None, None, :]
    running = goals.new_ones(t, m, b)
    observations, actions, rewards, alive = [], [], [], []
    with torch.no_grad():
        for step in range(h):
            mean, std = policy(position)
            action = mean + std * noise[step]
            observations.append(position)
            actions.append(action)
            alive.append(running)
            position, reward, arrived = _step(position, action, goal, action_scale, goal_tolerance)
            rewards.append(reward * running)
            running = running * (~arrived).to(running.dtype)
    return {"observations": torch.stack(observations, -2), "actions": torch.stack(actions, -2),
            "rewards": torch.stack(rewards, -1), "alive": torch.stack(alive, -1),
            "noise": noise}


def discounted_returns(rewards: torch.Tensor, discount: float = 0.99) -> torch.Tensor:
    r"""Returns-to-go :math:`G_t = \sum_{k \ge t} \gamma^{k-t} r_k` along the last dim."""
    out = torch.empty_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for step in range(rewards.size(-1) - 1, -1, -1):
        running = rewards[..., step] + discount * running
        out[..., step] = running
    return out


def linear_baseline_advantages(observations: torch.Tensor, returns: torch.Tensor,
                               ridge: float = 1e-5, normalize: bool = True,
                               alive: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""Advantages :math:`G_t - b(s_t, t)` over MAML-RL's linear feature baseline.

    Features :math:`[s, s^2, t/100, (t/100)^2, (t/100)^3, 1]`, with the weights fit by
    ridge-regularized least squares to the returns of each task and particle (over its
    episodes and steps). With ``normalize`` the advantages are standardized per task and
    particle (MAML-RL's default).

    :param observations: ``(..., B, H, 2)``; :param returns: ``(..., B, H)``.
    :param alive: ``(..., B, H)`` 0/1, the steps the episodes took (:func:`rollout`'s); the
        baseline is fit and the advantages standardized on those steps only, and the
        advantages are 0 after an episode has ended. ``None``: every step.
    :returns: ``(..., B, H)``.
    """
    if alive is not None and alive.shape != returns.shape:
        raise ValueError(f"alive must have the returns' shape {tuple(returns.shape)}, got "
                         f"{tuple(alive.shape)}")
    h = observations.size(-2)
    time = torch.arange(h, dtype=observations.dtype, device=observations.device) / 100.0
    time = time.expand(observations.shape[:-1])
    features = torch.cat([observations, observations.pow(2), time.unsqueeze(-1),
                          time.pow(2).unsqueeze(-1), time.pow(3).unsqueeze(-1),
                          torch.ones_like(time).unsqueeze(-1)], -1)  # (..., B, H, F)
    flat = features.flatten(-3, -2)  # (..., B*H, F)
    target = returns.flatten(-2).unsqueeze(-1)
    if alive is not None:  # the ended steps' rows drop out of the fit; an episode ended at
        # its first steps leaves a near-singular system, solved in float64
        flat = (flat * alive.flatten(-2).unsqueeze(-1)).double()
        target = target.double()
    gram = flat.transpose(-1, -2) @ flat
    eye = torch.eye(gram.size(-1), dtype=gram.dtype, device=gram.device)
    weights = torch.linalg.solve(gram + ridge * eye, flat.transpose(-1, -2) @ target)
    advantages = returns - (features @ weights.to(features.dtype).unsqueeze(-3)).squeeze(-1)
    dims = (-2, -1)
    if alive is None:
        if normalize:
            advantages = (advantages - advantages.mean(dims, keepdim=True)) / (
                advantages.std(dims, keepdim=True) + 1e-8)
        return advantages
    advantages = advantages * alive
    if normalize:  # moments over the steps taken (unbiased variance, as torch.std)
        count = alive.sum(dims, keepdim=True)
        mean = advantages.sum(dims, keepdim=True) / count
        var = ((advantages - mean).pow(2) * alive).sum(dims, keepdim=True) / (count - 1).clamp_min(1)
        advantages = (advantages - mean) * alive / (var.sqrt() + 1e-8)
    return advantages


class NavigationTasks:
    """The meta-RL task source: each task a goal; a batch rolls out the particles' policies.

    Adaptation data are rollouts of the particles' own policies, so they depend on the
    particles: a batch (:class:`NavigationBatch`) has ``resample_each_step = True`` and
    gives, for each phase, fresh rollouts of the particles it is handed, as
    :class:`~pyro_bmaml.engine.potential.PerParticle` ``(observations, actions, advantages)`` for
    a :class:`~pyro_bmaml.tasks.models.GaussianMLPPolicy`. The meta-learners are unchanged:
    BMAML's adaptation on these is SVPG (the chaser on ``episodes`` per particle, the leader
    on ``leader_episodes``), MAML's and EMAML's the policy-gradient step, and their query
    loss the surrogate on rollouts of the adapted policies.

    :param policy: the policy model (its layout unpacks the particles).
    :param episodes: episodes per particle and task for adaptation (B).
    :param leader_episodes: episodes of the leader's steps (more than ``episodes``).
    :param query_episodes: episodes that score the adapted policies (meta-loss, evaluation).
    :param horizon: steps per episode.
    :param discount: gamma of the returns-to-go.
    :param goal_range: goals uniform in ``[-goal_range, goal_range]^2``.
    :param action_scale, goal_tolerance: the environment's settings (the module docs);
        MAML-RL's and the official BMAML code's environment is ``action_scale=0.1,
        goal_tolerance=0.01``, the public PyTorch port's the defaults.
    """

    def __init__(self, policy, episodes: int = 10, leader_episodes: int = 20,
                 query_episodes: int = 10, horizon: int = 100, discount: float = 0.99,
                 goal_range: float = 0.5, action_scale: float = 1.0,
                 goal_tolerance: Optional[float] = None):
        from ..engine.potential import ModelPotential

        self.policy = policy
        self.episodes = check_int("episodes", episodes, 1)
        self.leader_episodes = check_int("leader_episodes", leader_episodes, 1)
        self.query_episodes = check_int("query_episodes", query_episodes, 1)
        self.horizon = check_int("horizon", horizon, 1)
        if not 0.0 < discount <= 1.0:
            raise ValueError(f"discount must be in (0, 1], got {discount}")
        self.discount = float(discount)
        self.goal_range = check_positive_float("goal_range", goal_range)
        self.action_scale, self.goal_tolerance = _check_env_settings(action_scale, goal_tolerance)
        self.potential = ModelPotential(policy).setup(*policy.example_args())

    def sample(self, batch_size: int, generator: torch.Generator) -> "NavigationBatch":
        """A meta-training batch: ``batch_size`` goals and a seed for each task's rollouts,
        drawn from ``generator`` (so a checkpointed generator resumes the same trajectory)."""
        return NavigationBatch(sample_goals(batch_size, generator, self.goal_range), self,
                               _task_seeds(batch_size, generator))

    def evaluation_tasks(self, num_tasks: int = 40, seed: int = 12345) -> "NavigationBatch":
        """Fixed held-out goals (and rollout seeds) from their own seeded generator."""
        g = torch.Generator().manual_seed(seed)
        return NavigationBatch(sample_goals(num_tasks, g, self.goal_range), self,
                               _task_seeds(num_tasks, g))

    def policy_fn(self, particles: torch.Tensor):
        """``observations (T, M, B, 2) -> (mean, std)`` of the particles ``(T, M, D)``."""
        weights = self.potential.unpack(particles.detach())
        return lambda observations: self.policy.forward(weights, observations)


def _task_seeds(num_tasks: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2**62, (num_tasks,), generator=generator)


class NavigationBatch:
    """A batch of navigation tasks (goals ``(T, 2)``): the meta-learners' batch protocol
    (:meth:`~pyro_bmaml.tasks.base.TaskBatch.adaptation_data`) with data from rollouts.

    Each task has its own stream of rollout noise: the ``k``-th rollout of a batch draws
    task ``t``'s noise from a generator seeded by ``(task_seeds[t], k)``. A slice of the
    batch (a process's shard under torch.distributed) therefore rolls out exactly what the
    whole batch does for those tasks, and meta-training on several processes follows the
    single-process trajectory. A batch counts its rollouts from its creation (slicing or
    moving it starts a new count, as ``fit`` does before any rollout); :meth:`evaluate`
    starts the count again, so evaluations are repeatable.
    """

    resample_each_step = True

    def __init__(self, goals: torch.Tensor, source: NavigationTasks, task_seeds: torch.Tensor):
        if goals.dim() != 2 or goals.size(-1) != 2:
            raise ValueError(f"goals must have shape (T, 2), got {tuple(goals.shape)}")
        if tuple(task_seeds.shape) != (goals.size(0),) or task_seeds.is_floating_point():
            raise ValueError(f"task_seeds must be an integer tensor of shape ({goals.size(0)},) "
                             f"(one per goal), got {task_seeds.dtype} {tuple(task_seeds.shape)}")
        self.goals, self.source, self.task_seeds = goals, source, task_seeds.cpu()
        self.rollouts_drawn = 0

    @property
    def num_tasks(self) -> int:
        return self.goals.size(0)

    def validate(self) -> "NavigationBatch":
        return self

    def to(self, *args, **kwargs) -> "NavigationBatch":
        return NavigationBatch(self.goals.to(*args, **kwargs), self.source, self.task_seeds)

    def __getitem__(self, index) -> "NavigationBatch":
        return NavigationBatch(self.goals[index], self.source, self.task_seeds[index])

    def generators(self) -> list:
        """One generator per task for the next rollout (then counts it)."""
        draw = self.rollouts_drawn
        self.rollouts_drawn += 1
        return [torch.Generator().manual_seed(hash((int(seed), draw)) & (2**63 - 1))
                for seed in self.task_seeds]

    def rollouts(self, particles: torch.Tensor, episodes: int) -> Dict[str, torch.Tensor]:
        """Rollouts of the particles ``(T, M, D)`` on the batch's goals."""
        src = self.source
        return rollout(src.policy_fn(particles), self.goals.to(particles), particles.size(1),
                       episodes, self.generators(), src.horizon, src.action_scale,
                       src.goal_tolerance)

    def adaptation_data(self, phase: str, particles: torch.Tensor) -> tuple:
        """``(observations, actions, advantages)`` per particle from fresh rollouts of
        ``particles`` (``episodes``, ``leader_episodes`` or ``query_episodes`` of them by
        phase), flattened over episodes and steps: each ``PerParticle`` ``(T, M, B*H, ...)``.
        With a ``goal_tolerance`` the steps after an episode ended weigh 0 and the others
        B*H / (steps taken), so that an average over the B*H rows is rllab's average over
        the steps taken (MAML-RL's surrogate)."""
        from ..engine.potential import PerParticle

        src = self.source
        episodes = {"support": src.episodes, "leader": src.leader_episodes,
                    "query": src.query_episodes}.get(phase)
        if episodes is None:
            raise ValueError(f"phase must be 'support', 'leader' or 'query', got {phase!r}")
        out = self.rollouts(particles, episodes)
        returns = discounted_returns(out["rewards"], src.discount)
        if src.goal_tolerance is None:
            advantages = linear_baseline_advantages(out["observations"], returns)
        else:
            alive = out["alive"]
            advantages = linear_baseline_advantages(out["observations"], returns, alive=alive)
            rows = alive.size(-2) * alive.size(-1)  # B * H
            advantages = advantages * rows / alive.sum((-2, -1), keepdim=True)
        return (PerParticle(out["observations"].flatten(2, 3)),
                PerParticle(out["actions"].flatten(2, 3)), PerParticle(advantages.flatten(2)))

    def evaluate(self, learner, num_steps: Optional[int] = None, metrics=None) -> dict:
        """Average return per episode of the particles' policies before and after adapting
        to each task (``num_steps`` adaptation steps, default the learner's ``adapt_steps``), on
        ``query_episodes`` fresh rollouts per particle; ``(mean, s.e.)`` over tasks."""
        self.rollouts_drawn = 0  # evaluation is repeatable: same goals, same noise
        steps = learner.adapt_steps if num_steps is None else check_int("num_steps", num_steps, 0)
        episodes = self.source.query_episodes
        with torch.no_grad():
            theta = learner.theta0.detach().unsqueeze(0).expand(self.num_tasks, -1, -1)
            before = self.rollouts(theta, episodes)["rewards"].sum(-1).mean((1, 2))
            adapted, _ = learner.adapt_on(self, "support", theta, steps)
            after = self.rollouts(adapted, episodes)["rewards"].sum(-1).mean((1, 2))
        return {"return": mean_and_se(after), "return_before": mean_and_se(before),
                "improvement": mean_and_se(after - before)}


from .registry import TaskFamily  # noqa: E402  (the CLI's entry for this module's family)


class NavigationFamily(TaskFamily):
    """``--task point-nav``: meta-RL on 2-D point navigation (goals as tasks, rollouts of the
    particles' policies as data, :class:`~pyro_bmaml.tasks.models.GaussianMLPPolicy` as
    model; the CLI's family entry)."""

    name = "navigation"
    eval_tasks = 40
    init = "paper"
    inner_steps = 1  # the paper's n

    def configure(self, task, args) -> dict:
        out = {"episodes": args.episodes, "temperature": args.temperature}
        if args.init_std is not None:  # (absent: the records' 0.1, earlier runs resumable)
            out["init_std"] = args.init_std
        # the environment's settings, recorded only when given (the port's environment
        # otherwise, as the records before them, whose checkpoints stay resumable)
        if args.action_scale is not None:
            out["action_scale"] = args.action_scale
        if args.goal_tolerance is not None:
            out["goal_tolerance"] = args.goal_tolerance
        return out

    def method_defaults(self, method: str, config: dict) -> dict:
        """MAML-RL's inner step 0.1 on the surrogate averaged over steps (MAML and EMAML's
        ``"nll"`` objective is that average); BMAML's SVPG step is on the sum over the
        N = ``episodes * horizon`` steps, so the same move takes 0.1 / N.

        The official BMAML code's SVPG step is ``fast_lr * ((1/alpha) K grad J_mean +
        grad K) / M`` on the average surrogate J_mean; in this parameterization (the summed
        surrogate, the repulsion and the prior weighted by ``temperature``) that is the step
        ``fast_lr / (alpha N)`` at temperature ``alpha N``. Its chaser runs on point
        navigation used fast_lr 0.1, alpha 0.1: a step 1 / N (``--step-size``), 10x the
        default's drive. The SVPG step stays fixed (``learn_step_size=False``): the meta-RL
        records (``results/meta_rl*.md``) were measured with it."""
        steps = config.get("episodes", 10) * 100
        return {
            "bmaml": {"step_size": 0.1 / steps, "objective": "chaser", "noise_step_size": None,
                      "learn_step_size": False},
            "emaml": {"step_size": 0.1, "objective": "nll"},
            "maml": {"step_size": 0.1, "objective": "nll"},
        }[method]

    def hidden(self, config):
        return (32, 32)

    def model(self, config):
        from .models import GaussianMLPPolicy

        return GaussianMLPPolicy(hidden=tuple(config["hidden"]),
                                 init_std=config.get("init_std", 0.1),
                                 temperature=config.get("temperature", 1.0))

    def sources(self, config, learner=None):
        policy = learner.model if learner is not None else self.model(config)
        # the leader's step takes as many fresh episodes as MAML's and EMAML's query loss:
        # every method sees the same rollouts per meta-iteration (2 x episodes)
        source = NavigationTasks(policy, episodes=config["episodes"],
                                 leader_episodes=config["episodes"],
                                 query_episodes=config["episodes"],
                                 action_scale=(1.0 if config.get("action_scale") is None
                                               else config["action_scale"]),
                                 goal_tolerance=config.get("goal_tolerance"))
        return source, source, None

    metrics = None  # the batch scores the learner itself (returns before / after)

    def headline(self, metrics: dict) -> str:
        return f"return after adaptation {metrics['return'][0]:.2f}"

    def summary(self, metrics: dict, num_tasks: int) -> str:
        after, before = metrics["return"], metrics["return_before"]
        return (f"average return per episode after adaptation {after[0]:.2f} +- {after[1]:.2f} "
                f"(before: {before[0]:.2f} +- {before[1]:.2f}; {num_tasks} held-out goals, "
                "mean +- s.e.)")

    def score(self, learner, tasks, num_steps=None):
        """``(metrics, table, markdown rows)`` of the report: the batch rolls the policies
        out before and after adaptation (no posterior over data, so no KSD)."""
        metrics = tasks.evaluate(learner, num_steps=num_steps)
        lines = [f"| {k} | {v[0]:.4g} | {v[1]:.2g} |" for k, v in metrics.items()]
        return metrics, dict(metrics), lines


NAVIGATION_FAMILY = NavigationFamily()
