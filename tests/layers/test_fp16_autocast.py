"""Every registered conv type under CPU float16 autocast (``torch.autocast('cpu', dtype=torch.float16)``):
a training forward and backward and an eval forward run, every output and gradient is finite, and they
are close to float32 (the same weights and input): outputs within 1e-2 of the float32 ones relative to
their largest magnitude, the gradient (all parameters and the input as one vector) within 1e-2 relative to
its norm (``total_grad_diff``: a ReLU inside a layer may flip for an input within rounding of zero, which
throws a four-entry bias but not the gradient as a whole). float16 keeps 11 significant bits (~5e-4 per
rounding); the hosts are two layers deep. The GPU check repeats this for whole backbones on CUDA."""
import copy

import pytest
import torch

import dynconv_mm  # noqa: F401  (registers the layers)
from dynconv_mm.gpu_check.hosts import build_host, disable_training_noise, host_input, host_objective, layer_hosts
from dynconv_mm.gpu_check.precision import rel_diff, total_grad_diff
from dynconv_mm.registry import registered_names

OUT_TOL = GRAD_TOL = 1e-2


def _run(model, x, train, autocast):
    ctx = torch.autocast('cpu', dtype=torch.float16) if autocast else torch.autocast('cpu', enabled=False)
    for p in model.parameters():
        p.grad = None
    if not train:
        model.eval()
        with torch.no_grad(), ctx:
            return model(x), {}
    model.train()
    x = x.clone().requires_grad_(True)
    with ctx:
        out = model(x)
        loss = host_objective(model, out)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    grads['input'] = x.grad
    return out, grads


def test_every_registered_conv_type_has_a_host():
    assert [h.name for h in layer_hosts()] == registered_names('conv')


@pytest.mark.parametrize('name', registered_names('conv'))
def test_fp16_autocast_on_the_cpu(name):
    try:
        with torch.autocast('cpu', dtype=torch.float16):
            pass
    except RuntimeError as e:  # torch < 2.3: CPU autocast takes bfloat16 only
        pytest.skip(f'float16 autocast on the CPU is not available in torch {torch.__version__}: {e}')
    host = layer_hosts([name])[0]
    model = build_host(host)
    disable_training_noise(model)
    half = copy.deepcopy(model)
    x = host_input(host, 3)
    for train in (True, False):
        out32, grads32 = _run(model, x, train, autocast=False)
        out16, grads16 = _run(half, x, train, autocast=True)
        assert torch.isfinite(out16).all(), name
        rel = rel_diff(out16, out32)
        assert rel <= OUT_TOL, f'{name} ({"train" if train else "eval"}): output {rel:.2e} from float32'
        assert set(grads16) == set(grads32)
        for key, g in grads16.items():
            assert torch.isfinite(g).all(), f'{name}: gradient of {key} not finite'
            assert g.dtype == grads32[key].dtype, key  # parameters and their gradients stay float32
        if train:
            rel = total_grad_diff(grads16, grads32)
            assert rel <= GRAD_TOL, f'{name}: gradient {rel:.2e} from float32'
