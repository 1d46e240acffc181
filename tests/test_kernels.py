"""Kernels: Pyro's convention, closed-form repulsion vs autograd, bandwidth rules, no NaN."""

import math

import pyro
import pytest
import torch

import pyro_bmaml as pb


@pytest.mark.parametrize("ours,stock", [
    (pb.RBFSteinKernel(bandwidth="pyro"), pyro.infer.RBFSteinKernel()),
    (pb.IMQSteinKernel(bandwidth="pyro"), pyro.infer.IMQSteinKernel()),
    (pb.IMQSteinKernel(0.7, -0.3, bandwidth="pyro", bandwidth_factor=2.0),
     pyro.infer.IMQSteinKernel(0.7, -0.3, bandwidth_factor=2.0)),
])
def test_log_kernel_and_grad_matches_pyro(ours, stock):
    x = torch.randn(7, 4)
    for a, b in zip(ours.log_kernel_and_grad(x), stock.log_kernel_and_grad(x)):
        assert torch.allclose(a, b, atol=1e-6)


def test_log_kernel_and_grad_is_differentiable_and_batched():
    x = torch.randn(3, 5, 2, requires_grad=True)
    log_k, grad = pb.RBFSteinKernel().log_kernel_and_grad(x)
    assert log_k.shape == grad.shape == (3, 5, 5, 2)
    assert log_k.requires_grad and grad.requires_grad
    for t in range(3):
        log_k_t, _ = pb.RBFSteinKernel().log_kernel_and_grad(x[t])
        assert torch.allclose(log_k[t], log_k_t)


@pytest.mark.parametrize("kernel", [
    pb.RBFSteinKernel(), pb.IMQSteinKernel(), pb.RBFSteinKernel(bandwidth="pyro"),
    pb.IMQSteinKernel(bandwidth=0.8),
])
def test_kernel_and_repulsion_against_autograd(kernel):
    torch.manual_seed(1)
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    K, R = kernel.kernel_and_repulsion(x)
    h = kernel.bandwidth(x)  # (2, 1) or (2, D), held fixed as the engine does
    for t in range(2):
        def k(a, b):
            r = ((a - b).pow(2) / h[t]).sum()
            return kernel._log_profile(r)[0].exp()
        for n in range(6):
            expected_r = torch.zeros(3, dtype=torch.float64)
            for m in range(6):
                xm = x[t, m].clone().requires_grad_()
                val = k(xm, x[t, n])
                assert torch.allclose(K[t, n, m], val)
                expected_r += torch.autograd.grad(val, xm)[0]
            assert torch.allclose(R[t, n], expected_r, atol=1e-10)


def test_bandwidth_rules():
    x = torch.randn(10, 3)
    sq = torch.cdist(x, x).pow(2)
    iu = torch.triu_indices(10, 10, 1)
    paper = pb.RBFSteinKernel(bandwidth="median").bandwidth(x)
    assert torch.allclose(paper, sq[iu[0], iu[1]].median() / math.log(10), rtol=1e-5)
    per_dim = pb.RBFSteinKernel(bandwidth="pyro").bandwidth(x)
    delta = (x[:, None] - x[None]).pow(2)[iu[0], iu[1]]
    assert torch.allclose(per_dim, delta.median(0).values / math.log(11))
    auto = pb.RBFSteinKernel()
    assert torch.allclose(auto.bandwidth(x), paper)
    assert torch.allclose(auto.bandwidth(x, per_dimension=True), per_dim)
    factor = pb.RBFSteinKernel(bandwidth="median", bandwidth_factor=3.0).bandwidth(x)
    assert torch.allclose(factor, 3 * paper)
    assert torch.allclose(pb.RBFSteinKernel(bandwidth=2.5).bandwidth(x), torch.tensor([2.5]))


def test_detach_bandwidth_switch():
    x = torch.randn(5, 2, requires_grad=True)
    assert not pb.RBFSteinKernel().bandwidth(x).requires_grad
    assert pb.RBFSteinKernel(detach_bandwidth=False).bandwidth(x).requires_grad


@pytest.mark.parametrize("kernel", [pb.RBFSteinKernel(), pb.IMQSteinKernel(),
                                    pb.RBFSteinKernel(bandwidth="pyro", detach_bandwidth=False)])
@pytest.mark.parametrize("mode", ["multivariate", "univariate"])
def test_identical_particles_give_no_nan(kernel, mode):
    x = torch.ones(6, 4, requires_grad=True)
    grad = torch.randn(6, 4)
    phi = pb.svgd_direction(x, grad, kernel, mode)
    assert torch.isfinite(phi).all()
    # identical particles: no repulsion, phi is k(x, x) times the mean gradient
    k0 = torch.exp(kernel._log_profile(torch.zeros(()))[0])
    assert torch.allclose(phi, k0 * grad.mean(0).expand(6, 4), atol=1e-6)
    (g,) = torch.autograd.grad(phi.sum(), x)
    assert torch.isfinite(g).all()


def test_scalar_bandwidth_keeps_repulsion_in_high_dimension():
    """The documented pitfall: per-dimension bandwidths in a multivariate kernel vanish."""
    x = torch.randn(20, 500)
    K_scalar, _ = pb.RBFSteinKernel(bandwidth="median").kernel_and_repulsion(x)
    K_per_dim, _ = pb.RBFSteinKernel(bandwidth="pyro").kernel_and_repulsion(x)
    off = ~torch.eye(20, dtype=torch.bool)
    # the median pair sits at r = log M, so k = 1 / M; per dimension, r ~ D log(M + 1)
    assert abs(K_scalar[off].median() - 1 / 20) < 0.005
    assert K_per_dim[off].max() < 1e-30


@pytest.mark.parametrize("bad,err", [
    (dict(bandwidth="silverman"), ValueError), (dict(bandwidth=-1.0), ValueError),
    (dict(bandwidth=[1.0]), TypeError), (dict(bandwidth_factor=0.0), ValueError),
    (dict(detach_bandwidth="yes"), TypeError),
])
def test_kernel_bad_arguments(bad, err):
    with pytest.raises(err, match=next(iter(bad))):
        pb.RBFSteinKernel(**bad)


def test_imq_bad_arguments():
    with pytest.raises(ValueError, match="alpha"):
        pb.IMQSteinKernel(alpha=0.0)
    with pytest.raises(ValueError, match="beta"):
        pb.IMQSteinKernel(beta=0.5)


def test_stock_pyro_svgd_accepts_our_kernels():
    import pyro.distributions as dist

    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    svgd = pyro.infer.SVGD(model, pb.IMQSteinKernel(), pyro.optim.Adam({"lr": 0.1}), 5, 0)
    svgd.step()
    assert pyro.param("svgd_particles").shape == (5,)


@pytest.mark.parametrize("kernel", [pb.RBFSteinKernel(), pb.IMQSteinKernel(0.3, -0.7),
                                    pb.RBFSteinKernel(bandwidth="median")])
def test_coordinatewise_terms_match_pyro_convention(kernel):
    """The lean univariate path equals Pyro's sums over log_kernel_and_grad."""
    x, g = torch.randn(2, 7, 3, dtype=torch.float64), torch.randn(2, 7, 3, dtype=torch.float64)
    log_k, k_grad = kernel.log_kernel_and_grad(x)
    attraction, repulsion = kernel.coordinatewise_direction_terms(x, g)
    assert torch.allclose(attraction, torch.einsum("...nmd,...md->...nd", log_k.exp(), g))
    assert torch.allclose(repulsion, -(log_k.exp() * k_grad).sum(-2))


@pytest.mark.parametrize("bandwidth", ["median", "pyro", 0.7])
def test_univariate_direction_in_chunks_equals_the_full_tensor(bandwidth):
    """Chunks of coordinates give the same direction (and gradient) as one (M, M, D) tensor;
    a single coordinate beyond the limit is refused with the size it needs."""
    from pyro_bmaml.engine.kernels import RBFSteinKernel

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 13, generator=g, dtype=torch.float64, requires_grad=True)
    score = torch.randn(2, 5, 13, generator=g, dtype=torch.float64)
    full = RBFSteinKernel(bandwidth=bandwidth)
    chunked = RBFSteinKernel(bandwidth=bandwidth)
    chunked.max_elements = 2 * 10 * 3  # three coordinates per chunk (2 tasks x P = 10 pairs)
    a_full, r_full = full.coordinatewise_direction_terms(x, score)
    a_chunk, r_chunk = chunked.coordinatewise_direction_terms(x, score)
    torch.testing.assert_close(a_chunk, a_full)
    torch.testing.assert_close(r_chunk, r_full)
    (g_full,) = torch.autograd.grad((a_full + r_full).pow(2).sum(), x)
    (g_chunk,) = torch.autograd.grad((a_chunk + r_chunk).pow(2).sum(), x)
    torch.testing.assert_close(g_chunk, g_full)
    chunked.max_elements = 10
    # one coordinate's pair terms: 2 tasks x P = 10 pairs
    with pytest.raises(ValueError, match="needs \\(..., P\\) = 20 elements per coordinate"):
        chunked.coordinatewise_direction_terms(x, score)


def test_median_selection_equals_torch_median():
    """The numpy selection behind the bandwidths gives torch.median's element (the lower
    median), and the autograd path (kthvalue) its gradient."""
    from pyro_bmaml.engine.kernels import _kth_smallest

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        for p in (1, 2, 45, 4950):
            values = torch.randn(7, p, dtype=dtype).pow(2)
            k = (p - 1) // 2
            assert torch.equal(_kth_smallest(values, k), values.median(-1).values)
            assert torch.equal(_kth_smallest(values.t().contiguous().t(), k),
                               values.median(-1).values)
    values = torch.rand(3, 9, dtype=torch.float64, requires_grad=True)
    picked = _kth_smallest(values, 4)
    picked.sum().backward()
    assert torch.equal(picked.detach(), values.detach().median(-1).values)
    assert torch.equal(values.grad.sum(-1), torch.ones(3, dtype=torch.float64))


def test_per_dimension_bandwidth_propagates_nan():
    x = torch.randn(6, 4)
    x[2, 1] = float("nan")
    h = pb.RBFSteinKernel(bandwidth="pyro").bandwidth(x, per_dimension=True)
    assert torch.isnan(h[1]) and torch.isfinite(h[[0, 2, 3]]).all()


def test_pairs_written_row_by_row_equal_the_gathered_ones():
    """From 32 particles on, the per-coordinate bandwidth reads pairs written particle by
    particle into one (D, P) buffer: the same values (bitwise) as the gathered form, hence
    the same bandwidth; under autograd the differentiable form is kept."""
    from pyro_bmaml.engine.kernels import (_ROWWISE_FROM, _coordinate_pair_squares,
                                           _pair_differences)

    g = torch.Generator().manual_seed(1)
    for shape in ((_ROWWISE_FROM, 9), (3, _ROWWISE_FROM + 5, 4), (5, 6)):
        x = torch.randn(*shape, generator=g)
        gathered = _pair_differences(x).square().transpose(-1, -2)
        pairs = _coordinate_pair_squares(x)
        assert pairs.is_contiguous() and torch.equal(pairs, gathered)
    x.requires_grad_()
    assert _coordinate_pair_squares(x).requires_grad
    x = torch.randn(40, 6, dtype=torch.float64, generator=g, requires_grad=True)
    kernel = pb.RBFSteinKernel(bandwidth="pyro", detach_bandwidth=False)
    h = kernel.bandwidth(x, per_dimension=True)
    assert torch.equal(h.detach(), pb.RBFSteinKernel(bandwidth="pyro").bandwidth(x.detach()))
    (grad,) = torch.autograd.grad(h.sum(), x)  # through the median, as before
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("kernel", [pb.RBFSteinKernel(), pb.IMQSteinKernel(0.3, -0.7),
                                    pb.RBFSteinKernel(bandwidth="median"),
                                    pb.RBFSteinKernel(bandwidth=0.4)])
@pytest.mark.parametrize("num_particles", [5, 33])
def test_given_bandwidth_gives_the_kernels_own_direction(kernel, num_particles):
    """A bandwidth passed in (as ``bandwidth`` returns it) gives the direction the kernel
    computes by itself, in both modes; a bandwidth of the wrong shape or type is refused."""
    from pyro_bmaml.engine.svgd import svgd_direction

    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, num_particles, 3, dtype=torch.float64, generator=g)
    score = torch.randn(2, num_particles, 3, dtype=torch.float64, generator=g)
    for mode in ("univariate", "multivariate"):
        h = kernel.bandwidth(x, per_dimension=mode == "univariate")
        torch.testing.assert_close(svgd_direction(x, score, kernel, mode, 0.5, h),
                                   svgd_direction(x, score, kernel, mode, 0.5))
    with pytest.raises(ValueError, match="bandwidth has shape \\(3,\\), expected \\(2, 1\\) or \\(2, 3\\)"):
        kernel.coordinatewise_direction_terms(x, score, torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="has shape \\(2, 3\\), expected \\(2, 1\\) or \\(2, 2\\)"):
        kernel.kernel_and_repulsion(x[..., :2], torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="bandwidth must be a tensor"):
        kernel.coordinatewise_direction(x, score, bandwidth=0.5)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", [pb.RBFSteinKernel(), pb.IMQSteinKernel(0.3, -0.7),
                                    pb.RBFSteinKernel(bandwidth="median")])
@pytest.mark.parametrize("max_elements", [None, 100])
def test_compiled_univariate_direction_equals_the_pairwise_one(kernel, max_elements):
    """Under torch.compile the univariate direction is one sum over all ordered pairs (or,
    differentiated beyond ``max_elements``, the pairwise form in chunks); it equals the
    eager pairwise form, value and gradient (float64: to rounding)."""
    import copy
    import warnings

    if max_elements is not None:  # 2 x 6 x 6 x 5 terms > 100: pairs, 3 coordinates a chunk
        kernel = copy.copy(kernel)
        kernel.max_elements = max_elements
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    score = torch.randn(2, 6, 5, dtype=torch.float64, generator=g)

    def direction(x, score):
        return kernel.coordinatewise_direction(x, score, 0.7)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(direction, dynamic=False)(x, score)
    eager = direction(x, score)
    torch.testing.assert_close(compiled, eager)
    weights = torch.randn(2, 6, 5, dtype=torch.float64, generator=g)
    (g_compiled,) = torch.autograd.grad((compiled * weights).sum(), x)
    (g_eager,) = torch.autograd.grad((eager * weights).sum(), x)
    torch.testing.assert_close(g_compiled, g_eager)
