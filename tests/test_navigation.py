"""2-D point navigation (the meta-RL family's environment): dynamics and reward by hand,
batched rollouts equal to stepping the gymnasium env, returns and the linear baseline, and
the SVPG score of the Gaussian policy model (REINFORCE at one particle and temperature 0)."""

import math

import pytest
import torch

pytest.importorskip("gymnasium")

import pyro_bmaml as pb  # noqa: E402
from pyro_bmaml.tasks.models import GaussianMLPPolicy  # noqa: E402
from pyro_bmaml.tasks.navigation import (PointNavigationEnv, discounted_returns,  # noqa: E402
                                   linear_baseline_advantages, rollout, sample_goals)
from pyro_bmaml.engine.potential import ModelPotential, PerParticle  # noqa: E402


def test_env_dynamics_and_reward_by_hand():
    env = PointNavigationEnv(goal=[0.3, -0.2], horizon=2)
    obs, info = env.reset(seed=0)
    assert obs.tolist() == [0.0, 0.0] and info["goal"].tolist() == [0.3, -0.2]
    obs, reward, terminated, truncated, _ = env.step([0.05, 0.5])  # clipped to (0.05, 0.1)
    assert obs == pytest.approx([0.05, 0.1])
    assert reward == pytest.approx(-math.hypot(0.25, 0.3))
    assert not terminated and not truncated
    obs, reward, _, truncated, _ = env.step([0.1, -0.3])  # to (0.15, 0.0)
    assert obs == pytest.approx([0.15, 0.0]) and reward == pytest.approx(-math.hypot(0.15, 0.2))
    assert truncated  # horizon 2
    with pytest.raises(ValueError, match=r"action must have shape \(2,\)"):
        env.step([0.1])
    drawn = PointNavigationEnv()
    goal_a = drawn.reset(seed=3)[1]["goal"]
    goal_b = drawn.reset(seed=3)[1]["goal"]
    assert goal_a.tolist() == goal_b.tolist() and max(abs(goal_a)) <= 0.5
    assert drawn.action_space.high.tolist() == [0.1, 0.1]


def test_batched_rollout_equals_stepping_the_env():
    """Every task, particle and episode at once == each one stepped through the env with the
    same noise (a linear policy per particle: mean = A_m s + b_m, sd 0.05)."""
    g = torch.Generator().manual_seed(0)
    goals = sample_goals(3, g, dtype=torch.float64)
    a = torch.randn(2, 2, 2, dtype=torch.float64, generator=g)  # (M, 2, 2)
    b = 0.05 * torch.randn(2, 2, dtype=torch.float64, generator=g)

    def policy(s):  # (T, M, B, 2)
        return torch.einsum("mij,tmbj->tmbi", a, s) + b[None, :, None], torch.tensor(0.05, dtype=torch.float64)

    out = rollout(policy, goals, num_particles=2, num_episodes=2, generator=g, horizon=7)
    assert out["observations"].shape == (3, 2, 2, 7, 2) and out["rewards"].shape == (3, 2, 2, 7)
    for t in range(3):
        env = PointNavigationEnv(goal=goals[t].numpy(), horizon=7)
        for m in range(2):
            for e in range(2):
                obs, _ = env.reset()
                for step in range(7):
                    s = torch.from_numpy(obs)
                    action = a[m] @ s + b[m] + 0.05 * out["noise"][step, t, m, e]
                    assert torch.allclose(out["observations"][t, m, e, step], s, rtol=0, atol=1e-14)
                    assert torch.allclose(out["actions"][t, m, e, step], action, rtol=0, atol=1e-14)
                    obs, reward, _, truncated, _ = env.step(action.numpy())
                    assert out["rewards"][t, m, e, step].item() == pytest.approx(reward, abs=1e-12)
                assert truncated



def test_maml_rl_environment_scales_actions_and_ends_at_the_goal():
    """rllab's normalized actions (the policy acts in [-1, 1], the point moves by 0.1 a) and
    MAML-RL's arrival within 0.01 of the goal, by hand; bad settings refused by name."""
    env = PointNavigationEnv(goal=[0.1, 0.0], horizon=5, action_scale=0.1, goal_tolerance=0.01)
    assert env.action_space.high.tolist() == pytest.approx([1.0, 1.0])
    env.reset(seed=0)
    obs, reward, terminated, _, _ = env.step([0.5, 3.0])  # 0.05, clip(0.3) = 0.1
    assert obs == pytest.approx([0.05, 0.1]) and not terminated
    assert reward == pytest.approx(-math.hypot(0.05, 0.1))
    obs, reward, terminated, truncated, _ = env.step([0.45, -0.95])  # to (0.095, 0.005)
    assert obs == pytest.approx([0.095, 0.005]) and terminated and not truncated
    assert reward == pytest.approx(-math.hypot(0.005, 0.005))
    for bad in (dict(action_scale=0.0), dict(goal_tolerance=-0.01)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            PointNavigationEnv(**bad)


def test_batched_rollout_ends_each_episode_where_the_env_does():
    """With a goal tolerance, the batched rollout's rewards and its alive mask equal the env
    stepped until it terminates (a policy heading for the goal, little noise, so that most
    episodes arrive at different steps); no reward after arrival."""
    g = torch.Generator().manual_seed(2)
    goals = sample_goals(3, g, goal_range=0.2, dtype=torch.float64)

    def policy(s):  # (T, M, B, 2): towards the goal, in normalized units
        return 20 * (goals[:, None, None] - s), torch.tensor(0.3, dtype=torch.float64)

    out = rollout(policy, goals, 1, 4, g, horizon=12, action_scale=0.1, goal_tolerance=0.01)
    alive = out["alive"]
    assert 0 < int((alive[..., -1] == 0).sum()) < alive[..., -1].numel()  # some arrive
    for t in range(3):
        env = PointNavigationEnv(goal=goals[t].numpy(), horizon=12, action_scale=0.1,
                                 goal_tolerance=0.01)
        for e in range(4):
            obs, _ = env.reset()
            ended = False
            for step in range(12):
                assert alive[t, 0, e, step].item() == (0.0 if ended else 1.0)
                if ended:
                    assert out["rewards"][t, 0, e, step].item() == 0.0
                    continue
                s = torch.from_numpy(obs)
                action = 20 * (goals[t] - s) + 0.3 * out["noise"][step, t, 0, e]
                obs, reward, ended, _, _ = env.step(action.numpy())
                assert out["rewards"][t, 0, e, step].item() == pytest.approx(reward, abs=1e-12)


def test_linear_baseline_on_the_steps_taken_only():
    """With an alive mask the baseline is the one fit to the steps taken alone (what follows
    an episode's end changes nothing), the advantages are 0 after it and standardized over
    the steps taken; a mask of the wrong shape is refused."""
    g = torch.Generator().manual_seed(3)
    obs = torch.rand(2, 3, 8, 2, generator=g, dtype=torch.float64)
    returns = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
    alive = torch.ones(2, 3, 8, dtype=torch.float64)
    alive[0, 1, 5:] = 0
    alive[1, 2, 2:] = 0
    returns = returns * alive
    adv = linear_baseline_advantages(obs, returns, alive=alive)
    junk = obs.clone()
    junk[alive == 0] = 7.0  # positions after the end must not matter
    assert torch.allclose(linear_baseline_advantages(junk, returns, alive=alive), adv)
    assert (adv[alive == 0] == 0).all()
    for m in range(2):
        taken = adv[m][alive[m] == 1]
        assert taken.mean().abs() < 1e-12 and taken.std().item() == pytest.approx(1.0, abs=1e-6)
    raw = linear_baseline_advantages(obs, returns, ridge=1e-10, normalize=False, alive=alive)
    # the fit on the steps taken: the ridge residuals of those steps alone
    time = torch.arange(8, dtype=torch.float64) / 100
    time = time.expand(obs.shape[:-1])
    feats = torch.cat([obs, obs.pow(2), time[..., None], time.pow(2)[..., None],
                       time.pow(3)[..., None], torch.ones_like(time)[..., None]], -1)
    for m in range(2):
        mask = alive[m] == 1
        x, y = feats[m][mask], returns[m][mask]
        w = torch.linalg.solve(x.T @ x + 1e-10 * torch.eye(8, dtype=x.dtype), x.T @ y)
        residual = y - x @ w
        assert torch.allclose(raw[m][mask], residual, atol=1e-6)
    with pytest.raises(ValueError, match="alive must have the returns' shape"):
        linear_baseline_advantages(obs, returns, alive=alive[..., :4])

def test_returns_and_linear_baseline():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    assert discounted_returns(rewards, 0.5).tolist() == [[1 + 0.5 * 2 + 0.25 * 3, 2 + 1.5, 3.0]]
    # returns that are exactly a linear function of the baseline's features: no advantage
    g = torch.Generator().manual_seed(1)
    obs = torch.rand(2, 4, 10, 2, generator=g, dtype=torch.float64)  # (M, B, H, 2)
    time = torch.arange(10, dtype=torch.float64) / 100
    returns = 2 * obs[..., 0] - obs[..., 1].pow(2) + 3 * time - time.pow(3) + 0.5
    adv = linear_baseline_advantages(obs, returns, ridge=1e-10, normalize=False)
    assert adv.abs().max() < 1e-6
    noisy = returns + torch.randn(returns.shape, generator=g, dtype=torch.float64)
    norm = linear_baseline_advantages(obs, noisy)
    assert torch.allclose(norm.mean((-2, -1)), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(norm.std((-2, -1)), torch.ones(2, dtype=torch.float64), atol=1e-6)


def _policy_data(policy, potential, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = potential.pack(policy.paper_init(m, generator=g, dtype=torch.float64))
    obs = torch.rand(m, 12, 2, generator=g, dtype=torch.float64) - 0.5
    act = 0.1 * torch.randn(m, 12, 2, generator=g, dtype=torch.float64)
    w = torch.randn(m, 12, generator=g, dtype=torch.float64) / 3  # advantages / episodes
    return theta, obs, act, w


def test_svpg_is_reinforce_at_one_particle_and_temperature_zero():
    """M = 1, alpha = 0: the SVPG step is step * the REINFORCE gradient
    sum_n w_n grad log pi(a_n | o_n), computed here by hand from the Gaussian density."""
    policy = GaussianMLPPolicy(hidden=(8,), temperature=0.0)
    potential = ModelPotential(policy)
    potential.setup(*(t.double() for t in policy.example_args()))
    theta, obs, act, w = _policy_data(policy, potential, 1)
    moved = pb.transport(potential, pb.RBFSteinKernel(bandwidth=1.0), theta, PerParticle(obs),
                         PerParticle(act), PerParticle(w), num_steps=1, step_size=0.1,
                         temperature=0.0)
    t = theta.clone().requires_grad_(True)
    named = potential.unpack(t)
    mean, std = policy.forward({k: v[0] for k, v in named.items()}, obs[0])
    log_pi = (-0.5 * ((act[0] - mean) / std).pow(2) - std.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
    (reinforce,) = torch.autograd.grad((w[0] * log_pi).sum(), t)
    torch.testing.assert_close(moved, theta + 0.1 * reinforce, rtol=1e-10, atol=1e-12)


def test_svpg_score_is_policy_gradient_plus_tempered_prior():
    """At temperature alpha the potential's score is the REINFORCE gradient plus alpha times
    the prior's score, per particle on its own rollouts."""
    cold = GaussianMLPPolicy(hidden=(8,), temperature=0.0)
    warm = GaussianMLPPolicy(hidden=(8,), temperature=0.3)
    prior_only = GaussianMLPPolicy(hidden=(8,), temperature=1.0)
    example = tuple(t.double() for t in cold.example_args())
    pots = [ModelPotential(p).setup(*example) for p in (cold, warm, prior_only)]
    theta, obs, act, w = _policy_data(cold, pots[0], 3, seed=2)
    args = (PerParticle(obs), PerParticle(act), PerParticle(w))
    g_cold = pots[0].log_density_and_grad(theta, *args)[1]
    g_warm = pots[1].log_density_and_grad(theta, *args)[1]
    g_prior = pots[2].log_density_and_grad(theta, *args)[1] - g_cold
    torch.testing.assert_close(g_warm, g_cold + 0.3 * g_prior, rtol=1e-10, atol=1e-10)
    # each particle is scored on its own data: particle 1 alone gives the same row
    alone = pots[1].log_density_and_grad(theta[1:2], PerParticle(obs[1:2]),
                                         PerParticle(act[1:2]), PerParticle(w[1:2]))[1]
    torch.testing.assert_close(alone[0], g_warm[1], rtol=1e-10, atol=1e-12)


def test_batch_protocol_phases():
    """The meta-learners' one question to a batch: its data for a phase."""
    batch = pb.Sinusoid(num_tasks=10, num_support=3).sample(2, torch.Generator().manual_seed(0))
    x, y = batch.adaptation_data("leader")
    assert x.shape == (2, 6, 1) and torch.equal(y[:, 3:], batch.y_query)
    assert batch.adaptation_data("support")[0] is batch.x_support
    assert not batch.resample_each_step
    with pytest.raises(ValueError, match="phase must be"):
        batch.adaptation_data("test")


def _navigation_learner(method="bmaml", seed=0):
    import pyro

    from pyro_bmaml.cli import build_learner, resolve_config, task_sources

    config = resolve_config({"task": "point-nav", "method": method, "particles": 5,
                             "inner_steps": 1, "leader_steps": 1, "seed": seed, "episodes": 10,
                             "temperature": 1.0})
    pyro.set_rng_seed(seed)
    learner = build_learner(config)
    source, tasks, _ = task_sources(config, learner)
    return learner, source, tasks


def test_rollout_batches_give_per_particle_policy_data():
    learner, source, _ = _navigation_learner()
    batch = source.sample(3, torch.Generator().manual_seed(0))
    theta = learner.theta0.detach().expand(3, -1, -1)
    obs, act, adv = batch.adaptation_data("support", theta)
    assert batch.resample_each_step and obs.tensor.shape == (3, 5, 10 * 100, 2)
    assert act.tensor.shape == (3, 5, 1000, 2) and adv.tensor.shape == (3, 5, 1000)
    assert batch.adaptation_data("leader", theta)[0].tensor.shape == (3, 5, 1000, 2)
    # normalized advantages per task and particle
    assert torch.allclose(adv.tensor.mean(-1), torch.zeros(3, 5), atol=1e-5)



def test_policy_data_after_arrival_weigh_nothing():
    """MAML-RL's environment: the steps after an episode ended weigh 0, and the weights of
    the steps taken are their standardized advantages times B*H / (steps taken), so that
    the surrogate's average over the B*H rows is rllab's average over the steps taken."""
    from pyro_bmaml.tasks.navigation import NavigationTasks

    learner, source, _ = _navigation_learner()
    wide = NavigationTasks(source.policy, episodes=4, action_scale=0.1, goal_tolerance=0.3)
    batch = wide.sample(3, torch.Generator().manual_seed(1))
    theta = learner.theta0.detach().expand(3, -1, -1)
    out = batch.rollouts(theta, 4)
    batch.rollouts_drawn = 0  # the same rollout again
    _, _, weights = batch.adaptation_data("support", theta)
    alive = out["alive"].flatten(2)  # (T, M, B*H)
    assert 0 < int(alive.sum()) < alive.numel()  # some episodes end early
    w = weights.tensor
    assert (w[alive == 0] == 0).all()
    taken = alive.sum(-1)
    standardized = w * taken.unsqueeze(-1) / alive.size(-1)
    for t in range(3):
        for m in range(5):
            kept = standardized[t, m][alive[t, m] == 1]
            assert kept.mean().abs() < 1e-5 and kept.std().item() == pytest.approx(1.0, abs=1e-4)

@pytest.mark.slow
def test_short_meta_training_improves_the_adapted_return():
    """BMAML (SVPG chaser), 60 meta-iterations: the policies adapted to 10 held-out goals
    return more than the un-meta-trained ones adapted alike (measured: -104 +- 8 before,
    -60 +- 3 after, over goals: the margin, 44, is > 5 s.e.; the test asks for 4)."""
    from pyro_bmaml.meta.training import evaluate

    learner, source, tasks = _navigation_learner()
    held_out = source.evaluation_tasks(10, seed=5)
    before = evaluate(learner, held_out)
    learner.fit(tasks, 60, meta_batch_size=10, progress=False)
    after = evaluate(learner, held_out)
    margin = 4 * max(before["return"][1], after["return"][1])
    assert after["return"][0] > before["return"][0] + margin
    assert set(after) == {"return", "return_before", "improvement"}


def test_cli_point_nav_train_and_evaluate(tmp_path, capsys):
    from pyro_bmaml.cli import main

    out = tmp_path / "nav"
    assert main(["train", "--task", "point-nav", "--method", "maml", "--iterations", "3",
                 "--eval-tasks", "4", "--no-progress", "--out", str(out),
                 "--meta-optimizer", "trpo", "--max-kl", "0.02"]) == 0
    config = torch.load(out / "checkpoint.pt", weights_only=True)["config"]
    assert (config["meta_optimizer"], config["max_kl"]) == ("trpo", 0.02)
    assert "average return per episode after adaptation" in capsys.readouterr().out
    assert (out / "evaluation" / "metrics.json").is_file()
    assert main(["evaluate", str(out / "checkpoint.pt"), "--out", str(tmp_path / "ev"),
                 "--eval-tasks", "4"]) == 0
    assert "return" in (tmp_path / "ev" / "metrics.md").read_text()


def test_cli_takes_maml_rl_environment(tmp_path):
    """``--action-scale 0.1 --goal-tolerance 0.01`` reach the task source and the recorded
    config (so ``evaluate`` rebuilds the same environment); BMAML's default SVPG step is
    MAML-RL's 0.1 on the summed surrogate, 0.1 / N."""
    from pyro_bmaml.cli import build_learner, main, resolve_config, task_sources

    out = tmp_path / "nav"
    assert main(["train", "--task", "point-nav", "--method", "bmaml", "--particles", "2",
                 "--episodes", "2", "--iterations", "1", "--eval-tasks", "2", "--no-progress",
                 "--out", str(out), "--action-scale", "0.1", "--goal-tolerance", "0.01",
                 "--temperature", "0.1"]) == 0
    config = torch.load(out / "checkpoint.pt", weights_only=True)["extra"]["config"]
    assert (config["action_scale"], config["goal_tolerance"]) == (0.1, 0.01)
    assert config["step_size"] == pytest.approx(0.1 / (2 * 100))
    learner = build_learner(config)
    source = task_sources(resolve_config(config), learner)[0]
    assert (source.action_scale, source.goal_tolerance) == (0.1, 0.01)
    assert main(["evaluate", str(out / "checkpoint.pt"), "--out", str(tmp_path / "ev"),
                 "--eval-tasks", "2"]) == 0

def test_a_shard_of_a_batch_rolls_out_what_the_whole_batch_does():
    """Each task's rollout noise comes from its own stream, so the tasks a process keeps
    under torch.distributed see the draws they would see in the whole batch; evaluation
    starts the streams again (repeatable)."""
    learner, source, _ = _navigation_learner()
    batch = source.sample(4, torch.Generator().manual_seed(1))
    shard = batch[2:]
    theta = learner.theta0.detach().expand(4, -1, -1)
    for _ in range(2):  # the k-th rollout of each, k = 0, 1
        whole = batch.rollouts(theta, 3)
        part = shard.rollouts(theta[2:], 3)
        assert torch.equal(whole["noise"][:, 2:], part["noise"])
        assert torch.equal(whole["rewards"][2:], part["rewards"])
    assert not torch.equal(batch.rollouts(theta, 3)["noise"], whole["noise"])  # a new draw
    held_out = source.evaluation_tasks(3, seed=2)
    assert held_out.evaluate(learner) == held_out.evaluate(learner)
    with pytest.raises(ValueError, match="one per task"):
        rollout(source.policy_fn(theta), batch.goals, 5, 1, [torch.Generator()], horizon=3)
    with pytest.raises(ValueError, match="task_seeds"):
        type(batch)(batch.goals, source, torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("cls", [pb.MAML, pb.EMAML])
def test_the_baselines_defaults_take_the_policy_gradient_surrogate(cls):
    """``objective="auto"`` on a policy (a pyro.factor of advantage-weighted actions, no
    target) is the surrogate ("nll"), not the squared error of the mean action (which failed
    with a TypeError); written as a README reader would, it meta-trains."""
    from pyro_bmaml.tasks.navigation import NavigationTasks

    policy = GaussianMLPPolicy(hidden=(8,), init_std=0.1)
    kwargs = {} if cls is pb.MAML else {"num_particles": 2}
    learner = cls(policy, init="paper", step_size=0.1, **kwargs)
    assert learner.objective == "nll" and learner.calibration == "none"
    history = learner.fit(NavigationTasks(policy, episodes=2), 2, meta_batch_size=2,
                          progress=False)
    assert len(history["loss"]) == 2 and all(math.isfinite(v) for v in history["loss"])
    assert torch.isfinite(learner.theta0).all()


def test_the_trust_region_meta_update_steps_within_its_region(tmp_path):
    """fit(meta_optimizer="trpo") on MAML and BMAML's chaser: every step's KL between the
    adapted policies before and after it is within max_kl, the loss it accepted improved (a
    step that does not improve is not taken), the configuration records it; objectives
    without a trust-region form and models that are not policies are refused."""
    from pyro_bmaml.tasks.navigation import NavigationTasks

    pyro_seed = 0
    import pyro

    pyro.set_rng_seed(pyro_seed)
    policy = GaussianMLPPolicy(hidden=(8,), init_std=1.0)
    learner = pb.MAML(policy, init="paper", step_size=0.1)
    start = learner.theta0.detach().clone()
    history = learner.fit(NavigationTasks(policy, episodes=4), 3, meta_batch_size=4,
                          progress=False, meta_optimizer="trpo", max_kl=0.01,
                          checkpoint=str(tmp_path / "run.pt"))
    for loss, terms in zip(history["loss"], history["terms"]):
        assert terms["kl"] <= 0.01 and math.isfinite(loss)
        assert (loss < terms["surrogate_before"]) == (terms["step_fraction"] > 0)
    assert any(t["step_fraction"] > 0 for t in history["terms"])
    assert not torch.equal(learner.theta0.detach(), start)
    state = torch.load(tmp_path / "run.pt", weights_only=True)
    assert state["config"]["meta_optimizer"] == "trpo" and state["config"]["max_kl"] == 0.01
    bmaml = pb.BMAML(policy, num_particles=2, init="paper", step_size=1e-4,
                     learn_step_size=False, inner_steps=1)  # the chaser, in its region
    history = bmaml.fit(NavigationTasks(policy, episodes=2), 2, meta_batch_size=2,
                        progress=False, meta_optimizer="trpo", max_kl=0.01)
    assert all(t["kl"] <= 0.01 for t in history["terms"])
    assert all((loss < t["surrogate_before"]) == (t["step_fraction"] > 0)
               for loss, t in zip(history["loss"], history["terms"]))
    # the official code's BMAMLTRPO: SVPG adaptation, TRPO on the post-update surrogate
    pyro.set_rng_seed(pyro_seed)
    surrogate = pb.BMAML(policy, num_particles=2, init="paper", objective="bfa",
                         step_size=1e-3, learn_step_size=False, inner_steps=1)
    start = surrogate.theta0.detach().clone()
    history = surrogate.fit(NavigationTasks(policy, episodes=4), 3, meta_batch_size=4,
                            progress=False, meta_optimizer="trpo", max_kl=0.01)
    for loss, terms in zip(history["loss"], history["terms"]):
        assert terms["kl"] <= 0.01 and (loss < terms["surrogate_before"]) == (
            terms["step_fraction"] > 0)
    assert any(t["step_fraction"] > 0 for t in history["terms"])
    assert not torch.equal(surrogate.theta0.detach(), start)
    with pytest.raises(ValueError, match="meta_optimizer='trpo'"):  # not the mixture NLL
        surrogate.fit(NavigationTasks(policy, episodes=2), 1, meta_batch_size=2, progress=False)
    with pytest.raises(ValueError, match="meta_optimizer must be one of"):
        learner.fit(NavigationTasks(policy, episodes=2), 1, progress=False, meta_optimizer="sgd")
    regression = pb.MAML(pb.BayesianMLP(hidden=(4,)), init="paper", calibration="none")
    with pytest.raises(ValueError, match="needs a policy"):
        regression.fit(pb.Sinusoid(num_tasks=10, num_support=5), 1, meta_batch_size=2,
                       progress=False, meta_optimizer="trpo")
