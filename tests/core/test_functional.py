"""Per-sample gradients, dots and HVPs against plain autograd loops."""
import pytest
import torch
from torch.func import functional_call

from hydrattr._core.functional import ParamSpec, per_sample_dots_and_hvp, per_sample_grads


def _model(batchnorm=False, dropout=0.0):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(4, 6, dtype=torch.float64)]
    if batchnorm:
        layers.append(torch.nn.BatchNorm1d(6, dtype=torch.float64))
    layers += [torch.nn.Tanh()]
    if dropout:
        layers.append(torch.nn.Dropout(dropout))
    layers.append(torch.nn.Linear(6, 3, dtype=torch.float64))
    m = torch.nn.Sequential(*layers).train()
    for layer in m.modules():  # as hydrattr's module_mode does for replays: train-mode
        if isinstance(layer, torch.nn.BatchNorm1d):  # outputs use batch statistics only,
            layer.track_running_stats = False  # and transforms cannot mutate buffers
    names = [n for n, _ in m.named_parameters()]
    shapes = [p.shape for _, p in m.named_parameters()]
    spec = ParamSpec(names, shapes, [sum(p.numel() for p in m.parameters())])
    theta = spec.flatten(dict(m.named_parameters())).detach()

    def loss_fn(t, x, y):
        out = functional_call(m, spec.unflatten(t), (x,))
        return torch.nn.functional.cross_entropy(out, y, reduction="none")

    return m, spec, theta, loss_fn


def _loop_grads(loss_fn, theta, x, y, rng=None):
    """Reference: one autograd.grad per sample through the whole-batch forward."""
    out = []
    for i in range(len(x)):
        t = theta.clone().requires_grad_(True)
        if rng is not None:
            torch.set_rng_state(rng)
        li = loss_fn(t, x, y)[i]
        out.append(torch.autograd.grad(li, t)[0])
    return torch.stack(out)


def test_vmap_per_sample_grads_match_loop():
    m, spec, theta, loss_fn = _model()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    g = per_sample_grads(loss_fn, theta, x, y, independent=True)
    torch.testing.assert_close(g, _loop_grads(loss_fn, theta, x, y), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("vectorize", [True, False], ids=["jacrev", "backward-loop"])
@pytest.mark.parametrize("batchnorm,dropout", [(True, 0.0), (False, 0.4), (True, 0.4)])
def test_jacobian_per_sample_grads_include_coupling_and_masks(batchnorm, dropout, vectorize):
    m, spec, theta, loss_fn = _model(batchnorm, dropout)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0, 2])
    rng = torch.get_rng_state()
    g = per_sample_grads(loss_fn, theta, x, y, independent=False, rng_state=(rng, None),
                         vectorize=vectorize)
    ref = _loop_grads(loss_fn, theta, x, y, rng=rng)
    torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-14)
    if batchnorm:  # coupling matters: isolated samples give different gradients
        iso = per_sample_grads(loss_fn, theta, x[:2], y[:2], independent=False)
        assert not torch.allclose(iso, g[:2])


@pytest.mark.parametrize("vectorize", [True, False])
def test_dots_and_hvp_match_autograd(vectorize):
    m, spec, theta, loss_fn = _model(batchnorm=True)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    w = torch.full((5,), 0.2, dtype=torch.float64)
    V = torch.randn(3, spec.n_params, dtype=torch.float64)
    dots, hv = per_sample_dots_and_hvp(loss_fn, theta, x, y, w, V, vectorize=vectorize)
    G = _loop_grads(loss_fn, theta, x, y)
    torch.testing.assert_close(dots, V @ G.T, rtol=1e-11, atol=1e-13)
    f = lambda t: (w * loss_fn(t, x, y)).sum()  # noqa: E731
    for k in range(3):
        ref = torch.autograd.functional.hvp(f, theta, V[k])[1]
        torch.testing.assert_close(hv[k], ref, rtol=1e-11, atol=1e-13)
    dots2, none = per_sample_dots_and_hvp(loss_fn, theta, x, y, w, V, hessian=False)
    assert none is None
    torch.testing.assert_close(dots2, dots, rtol=1e-12, atol=1e-14)


def test_param_spec_roundtrip_and_expand():
    spec = ParamSpec(["a", "b"], [torch.Size([2, 3]), torch.Size([4])], [6, 4])
    theta = torch.arange(10.0)
    parts = spec.unflatten(theta)
    assert parts["a"].shape == (2, 3) and parts["b"].tolist() == [6, 7, 8, 9]
    torch.testing.assert_close(spec.flatten(parts), theta)
    e = spec.expand(torch.tensor([1.0, 2.0]))
    assert e.tolist() == [1.0] * 6 + [2.0] * 4
    with pytest.raises(ValueError, match="group_sizes"):
        ParamSpec(["a"], [torch.Size([2])], [3])
