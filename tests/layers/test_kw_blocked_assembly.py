"""The blocked CPU kernel assembly of KW layers: same kernels and gradients as the one-product form."""
import pytest
import torch

import dynconv_mm
import dynconv_mm.layers.kernel_warehouse as kw
from dynconv_mm.benchmark import KWLayerBlock, kw_reference_forward


@pytest.mark.parametrize('cin,cout,k,ratio,groups,block', [(8, 8, 3, 1.0, 1, 3), (8, 16, 3, 4.0, 1, 20),
                                                          (16, 8, 1, 1.0, 1, 8), (8, 8, 3, 1.0, 8, 1),
                                                          (8, 16, 1, 1.0, 1, 4096)])
def test_blocked_assembly_matches_one_product(monkeypatch, cin, cout, k, ratio, groups, block):
    monkeypatch.setattr(kw, 'ASSEMBLY_BLOCK_COLUMNS', block)  # several blocks, uneven last block
    torch.manual_seed(0)
    layer_block = KWLayerBlock(cin, cout, k, ratio, padding=k // 2, groups=groups).double()
    dynconv_mm.set_temperature(layer_block, 0.4)
    x = torch.randn(3, cin, 6, 6, dtype=torch.float64, requires_grad=True)
    layer = layer_block.conv
    weight = layer.assemble_kernel(layer.attention(x))
    assert 'BlockedAssembly' in type(weight.grad_fn).__name__ or 'BlockedAssembly' in str(
        weight.grad_fn.next_functions)
    out = layer_block(x)
    ref = kw_reference_forward(layer, x)  # one mm, reshape/permute, folded conv
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    params = [x] + list(layer_block.parameters())
    grads = torch.autograd.grad((out * g).sum(), params)
    ref_grads = torch.autograd.grad((ref * g).sum(), params)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_blocked_assembly_gradcheck(monkeypatch):
    monkeypatch.setattr(kw, 'ASSEMBLY_BLOCK_COLUMNS', 5)
    attention = torch.randn(2, 9, 4, dtype=torch.float64, requires_grad=True)
    cells = torch.randn(4, 3, 2, 1, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c: kw._BlockedAssembly.apply(a, c, (9, 1, 1), 2), (attention, cells))


def test_plain_product_under_autocast_and_export_paths():
    a = torch.randn(2, 3, 4)
    c = torch.randn(4, 2, 2, 1, 1)
    assert kw._blocked_assembly_applies(a, c)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not kw._blocked_assembly_applies(a, c)
    assert not kw._blocked_assembly_applies(a.bfloat16(), c.bfloat16())
