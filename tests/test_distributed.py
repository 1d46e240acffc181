"""Meta-training on torch.distributed (2 CPU processes, gloo over a file rendezvous) follows
the single-process trajectory with the same total meta-batch (sinusoid and meta-RL); device
placement; the CUDA path end to end (skipped without a GPU)."""


import pyro
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pyro_bmaml as pb
from pyro_bmaml.meta import distributed
from pyro_bmaml.tasks.models import BayesianMLP


def _learner():
    pyro.set_rng_seed(0)
    return pb.BMAML(BayesianMLP(hidden=(8, 8)), num_particles=4, init="paper")


def _fit(learner, folder, iterations, stop_after=None):
    pool = pb.Sinusoid(num_tasks=20, num_support=5)
    train, held_out = pool.split(4, seed=0)
    return learner.fit(train, iterations, meta_batch_size=4, seed=3, progress=False,
                       calibration_tasks=held_out, checkpoint=str(folder / "ckpt.pt"),
                       checkpoint_every=1, stop_after=stop_after,
                       eval_tasks=pool.evaluation_tasks(4), eval_every=2)


def _worker(rank, world, folder):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=world)
    try:
        learner = _learner()
        if rank == 1:  # a different start on rank 1: fit must broadcast rank 0's state
            with torch.no_grad():
                learner.theta0.add_(1.0)
        _fit(learner, folder, 4, stop_after=2)  # interrupted ...
        dist.barrier()
        learner = _learner()
        history = _fit(learner, folder, 4)  # ... and resumed from rank 0's checkpoint
        torch.save({"theta0": learner.theta0.detach(), "offset": learner.noise_offset.detach(),
                    "loss": history["loss"], "evals": len(history["eval"])},
                   folder / f"rank{rank}.pt")
        dist.barrier()  # both ranks done before teardown (a rank leaving early aborted once)
    finally:
        dist.destroy_process_group()


def test_two_processes_follow_the_single_process_trajectory(tmp_path):
    """2 ranks x 2 tasks == 1 process x 4 tasks: same parameters after 4 meta-steps (float32
    sums in another order: 1e-5 relative), same losses, and only rank 0 evaluates."""
    single_dir = tmp_path / "single"
    single_dir.mkdir()
    learner = _learner()
    history = _fit(learner, single_dir, 4)
    multi_dir = tmp_path / "multi"
    multi_dir.mkdir()
    mp.spawn(_worker, args=(2, multi_dir), nprocs=2, join=True)
    ranks = [torch.load(multi_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for state in ranks:
        torch.testing.assert_close(state["theta0"], learner.theta0.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state["offset"], learner.noise_offset.detach(),
                                   rtol=1e-5, atol=1e-6)
        assert state["loss"] == pytest.approx(history["loss"], rel=1e-5)
    assert torch.equal(ranks[0]["theta0"], ranks[1]["theta0"])  # identical on the ranks
    # rank 0 alone evaluates: rank 1 holds only the entry restored from rank 0's checkpoint
    assert ranks[0]["evals"] == len(history["eval"]) == 2 and ranks[1]["evals"] == 1


def _navigation(seed=0):
    from test_navigation import _navigation_learner

    learner, _, tasks = _navigation_learner(seed=seed)
    return learner, tasks


def _navigation_worker(rank, world, folder):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=world)
    try:
        learner, tasks = _navigation()
        history = learner.fit(tasks, 3, meta_batch_size=4, seed=3, progress=False)
        torch.save({"theta0": learner.theta0.detach(), "loss": history["loss"]},
                   folder / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_meta_rl_on_two_processes_follows_the_single_process_trajectory(tmp_path):
    """Meta-RL too: each task's rollouts come from its own noise stream, so a rank's two
    goals are rolled out as in the 4-goal single process (SVPG chaser, 3 meta-steps)."""
    learner, tasks = _navigation()
    history = learner.fit(tasks, 3, meta_batch_size=4, seed=3, progress=False)
    mp.spawn(_navigation_worker, args=(2, tmp_path), nprocs=2, join=True)
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(state["theta0"], learner.theta0.detach(), rtol=1e-5, atol=1e-6)
        assert state["loss"] == pytest.approx(history["loss"], rel=1e-4)


def test_shard_splits_evenly_or_says_why(monkeypatch):
    batch = pb.Sinusoid(num_tasks=20, num_support=5).sample(6, torch.Generator().manual_seed(0))
    assert distributed.shard(batch) is batch  # no process group: the whole batch
    monkeypatch.setattr(distributed, "rank_and_size", lambda: (1, 3))
    part = distributed.shard(batch)
    assert part.num_tasks == 2 and torch.equal(part.x_support, batch.x_support[2:4])
    monkeypatch.setattr(distributed, "rank_and_size", lambda: (0, 4))
    with pytest.raises(ValueError, match=r"meta_batch_size \(6\) must be a multiple of the "
                                         r"number of processes \(4\)"):
        distributed.shard(batch)


def test_tasks_are_moved_to_the_learner(monkeypatch):
    """fit, evaluate and adapt move task data to the learner's device and dtype path: here a
    float64 learner on the CPU gets float64 data and CPU tensors come back."""
    learner = _learner()
    seen = []
    original = learner.meta_loss

    def spy(batch, *args):
        seen.append(batch.x_support.device)
        return original(batch, *args)

    monkeypatch.setattr(learner, "meta_loss", spy)
    learner.fit(pb.Sinusoid(num_tasks=20, num_support=5), 2, meta_batch_size=2, progress=False)
    assert seen and all(d == learner.theta0.device for d in seen)
    post = learner.adapt(torch.zeros(3, 1), torch.zeros(3))
    assert post.particles.device == learner.theta0.device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_end_to_end(tmp_path):
    """fit a few iterations, adapt, evaluate and export InferenceData with the learner on
    the GPU (tasks drawn on the CPU and moved), then reload the checkpoint on the CPU."""
    from pyro_bmaml.meta.training import evaluate

    learner = _learner().to("cuda")
    source = pb.Sinusoid(num_tasks=20, num_support=5)
    learner.fit(source, 3, meta_batch_size=4, progress=False, checkpoint=str(tmp_path / "c.pt"),
                eval_tasks=source.evaluation_tasks(4), eval_every=2)
    assert learner.theta0.is_cuda
    tasks = source.evaluation_tasks(4)
    post = learner.adapt(tasks.x_support, tasks.y_support)
    assert post.particles.is_cuda
    metrics = evaluate(learner, tasks, closed_form=True)
    assert 0.0 <= metrics["coverage"][0.9][0] <= 1.0
    idata = post.to_inference_data(tasks.x_query, tasks.y_query)
    assert idata.posterior["layer0.weight"].shape[:2] == (1, 4)
    cpu = _learner()
    cpu.load_checkpoint(tmp_path / "c.pt")
    torch.testing.assert_close(cpu.theta0, learner.theta0.cpu())
