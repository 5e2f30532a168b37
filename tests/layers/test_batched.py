"""The one batched per-sample convolution primitive, against a per-sample F.conv loop."""
import pytest
import torch

from dynconv_mm.layers.batched import batched_conv, reference_batched_conv, resolve_impl
from dynconv_mm.layers.torch_internals import onnx_export_kwargs

CASES = [
    # (ndim, B, C_in, C_out, k, stride, padding, dilation, groups, spatial)
    (2, 3, 4, 6, 3, 1, 1, 1, 1, (9, 7)),
    (2, 2, 4, 8, 3, 2, 1, 1, 2, (11, 10)),
    (2, 2, 6, 6, 5, 1, 4, 2, 6, (8, 9)),      # depth-wise, dilated
    (2, 1, 4, 4, 1, 1, 0, 1, 1, (5, 5)),      # batch of one
    (2, 4, 8, 4, (3, 1), (2, 1), (1, 0), 1, 4, (7, 6)),
    (1, 3, 4, 6, 3, 2, 1, 1, 2, (13,)),
    (3, 2, 4, 4, 3, 1, 1, 1, 2, (5, 6, 4)),
]


def _make(ndim, B, C_in, C_out, k, groups, spatial, bias_mode, dtype=torch.float32):
    k = (k,) * ndim if isinstance(k, int) else k
    x = torch.randn(B, C_in, *spatial, dtype=dtype)
    w = torch.randn(B, C_out, C_in // groups, *k, dtype=dtype)
    bias = {None: None, 'shared': torch.randn(C_out, dtype=dtype),
            'sample': torch.randn(B, C_out, dtype=dtype)}[bias_mode]
    return x, w, bias


@pytest.mark.parametrize('case,impl', [(c, i) for c in CASES for i in ('auto', 'grouped', 'loop', 'unfold', 'matmul')
                                        if not (i == 'unfold' and c[0] == 3)  # unfold: 1-D/2-D only
                                        and not (i == 'matmul' and (c[4] != 1 or c[6] != 0))])  # point-wise only
@pytest.mark.parametrize('bias_mode', [None, 'shared', 'sample'])
def test_matches_per_sample_reference(case, impl, bias_mode):
    ndim, B, C_in, C_out, k, s, p, d, g, spatial = case
    x, w, bias = _make(ndim, B, C_in, C_out, k, g, spatial, bias_mode)
    ref = reference_batched_conv(x, w, bias, s, p, d, g)
    out = batched_conv(x, w, bias, s, p, d, g, impl=impl)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('impl', ['grouped', 'loop', 'unfold'])
def test_gradcheck(impl):
    x, w, bias = _make(2, 2, 4, 4, 3, 2, (5, 4), 'sample', torch.float64)
    for t in (x, w, bias):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b, c: batched_conv(a, b, c, 2, 1, 1, 2, impl=impl), (x, w, bias))


def test_auto_choice_and_errors():
    x = torch.randn(1, 2, 4, 4)
    assert resolve_impl('auto', x, 1, 2) == 'single'
    assert resolve_impl('auto', torch.randn(3, 2, 4, 4), 3, 2) == 'grouped'
    with pytest.raises(ValueError, match='unknown batched_conv impl'):
        batched_conv(x, torch.randn(1, 2, 2, 3, 3), impl='fast')
    with pytest.raises(ValueError, match='kernel dims'):
        batched_conv(x, torch.randn(2, 2, 3, 3))
    with pytest.raises(ValueError, match='spatial dims'):
        batched_conv(torch.randn(2, 3), torch.randn(2, 2, 3))


def test_bf16_autocast_close_to_float32():
    x, w, bias = _make(2, 3, 8, 8, 3, 1, (9, 9), 'shared')
    ref = reference_batched_conv(x, w, bias, 1, 1, 1, 1)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = batched_conv(x, w, bias, 1, 1, 1, 1, impl='grouped')
    rel = (out.float() - ref).abs().max() / ref.abs().max()
    assert rel < 2e-2


def test_onnx_export_keeps_dynamic_batch(tmp_path):
    onnx = pytest.importorskip('onnx')  # noqa: F841
    ort = pytest.importorskip('onnxruntime')

    class M(torch.nn.Module):
        def forward(self, x, w):
            return batched_conv(x, w, None, 1, 1, 1, 2)

    x, w, _ = _make(2, 2, 4, 6, 3, 2, (8, 8), None)
    path = str(tmp_path / 'b.onnx')
    torch.onnx.export(M(), (x, w), path, input_names=['x', 'w'], output_names=['y'],
                      dynamic_axes={'x': {0: 'b'}, 'w': {0: 'b'}, 'y': {0: 'b'}}, **onnx_export_kwargs())
    sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    for B in (1, 2, 5):
        x, w, _ = _make(2, B, 4, 6, 3, 2, (8, 8), None)
        y = sess.run(None, {'x': x.numpy(), 'w': w.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(y), reference_batched_conv(x, w, None, 1, 1, 1, 2),
                                   rtol=1e-4, atol=1e-4)


def test_auto_takes_unfold_for_large_kernels_on_small_outputs():
    x = torch.randn(2, 512, 4, 4)
    big = (512, 512, 3, 3)  # 2.4M entries per sample
    assert resolve_impl('auto', x, 2, 2, (3, 3), (1, 1), big, 16) == 'unfold'
    assert resolve_impl('auto', x, 2, 2, (3, 3), (1, 1), big, 257) == 'grouped'  # large output
    assert resolve_impl('auto', x, 2, 2, (3, 3), (1, 1), (128, 128, 3, 3), 16) == 'grouped'  # small kernel
    assert resolve_impl('auto', x, 2, 2, (3, 3), (1, 1), (512, 256, 3, 3), 16, groups=2) == 'grouped'
    assert resolve_impl('auto', x, 1, 2, (3, 3), (1, 1), big, 16) == 'single'
    assert resolve_impl('auto', x, 2, 2, (1, 1), (0, 0), (2048, 1024, 1, 1), 16) == 'matmul'
    assert resolve_impl('auto', torch.randn(2, 8, 4, 4, 4), 2, 3, (3, 3, 3), (1, 1, 1),
                        (512, 512, 3, 3, 3), 64) == 'grouped'  # 3-D stays grouped


def test_auto_on_large_kernels_matches_reference_with_gradients():
    torch.manual_seed(0)
    # (B, C_in, C_out, spatial, stride): 1.2M-entry kernels, 2x2 / 4x4 outputs -> the unfold path
    for B, C_in, C_out, size, stride in ((2, 256, 512, 4, 2), (3, 256, 512, 4, 1)):
        x = torch.randn(B, C_in, size, size, dtype=torch.float64, requires_grad=True)
        w = torch.randn(B, C_out, C_in, 3, 3, dtype=torch.float64, requires_grad=True)
        _assert_same_with_grads(batched_conv(x, w, None, stride, 1, 1, 1),
                                reference_batched_conv(x, w, None, stride, 1, 1, 1), (x, w), 1e-10)


def _assert_same_with_grads(out, ref, inputs, tol):
    """``out`` and ``ref`` agree, and so do their gradients for ``inputs``; returns ours."""
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, g)
    for a, b in zip(grads, torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    return grads


@pytest.mark.parametrize('impl,k,padding', [('matmul', 1, 0), ('unfold', 3, 1)])
def test_weight_grad_buffer_receives_the_weight_gradient(impl, k, padding):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 6, 2, k, k, dtype=torch.float64, requires_grad=True)
    memory = torch.full((w.numel() + 7,), float('nan'), dtype=torch.float64)
    handed = []

    def buffer(shape, like):
        handed.append(shape)
        return memory[:like.numel()].view(shape)

    _, gw = _assert_same_with_grads(batched_conv(x, w, None, 1, padding, 1, 2, impl=impl, weight_grad_buffer=buffer),
                                    reference_batched_conv(x, w, None, 1, padding, 1, 2), (x, w), 1e-12)
    assert handed and gw.data_ptr() == memory.data_ptr()  # written into the given memory
    # a differentiable backward takes the plain products (second derivatives work)
    out = batched_conv(x, w, None, 1, padding, 1, 2, impl=impl, weight_grad_buffer=buffer)
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    (ggw,) = torch.autograd.grad(gx.sum(), w)
    ref = reference_batched_conv(x, w, None, 1, padding, 1, 2)
    (rgx,) = torch.autograd.grad(ref.square().sum(), x, create_graph=True)
    (rggw,) = torch.autograd.grad(rgx.sum(), w)
    torch.testing.assert_close(ggw, rggw, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # nothing handed out without a backward pass
        handed.clear()
        batched_conv(x, w, None, 1, padding, 1, 2, impl=impl, weight_grad_buffer=buffer)
    assert not handed
