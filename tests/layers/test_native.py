"""The native CPU kernel of the KW assembly: same kernels as the PyTorch product, its limits, and the
fallback where it cannot be built."""
import pytest
import torch
from conftest import at_thread_counts

import dynconv_mm
from dynconv_mm.benchmark import KWLayerBlock, reference_forward
from dynconv_mm.layers import native
from dynconv_mm.layers.kernel_warehouse import cpu_backend as kw


def _reference(wt, attention, groups, c_o, c_i, ck):
    """The kernel layout ``(B, G_o, c_o, G_i, c_i, G_s, *ck)`` from one float64 product."""
    B, M, n = attention.shape
    g_s, g_o, g_i = groups
    d = len(ck)
    mixed = wt.double() @ attention.double().reshape(B * M, n).t()  # (c_o * c_i * k, B * M)
    mixed = mixed.reshape((c_o, c_i) + ck + (B, g_s, g_o, g_i))
    return mixed.permute((2 + d, 4 + d, 0, 5 + d, 1, 3 + d) + tuple(range(2, 2 + d)))


@pytest.mark.parametrize('B,groups,c_o,c_i,ck,n', [
    (1, (1, 1, 1), 8, 8, (3, 3), 5),        # 1 column
    (1, (1, 2, 2), 16, 8, (3, 3), 7),       # 4 columns
    (2, (1, 2, 2), 5, 3, (1, 1), 6),        # 8 columns, rows not a multiple of the tile
    (1, (9, 1, 1), 8, 4, (1, 1), 11),       # 9 columns (a 16-column vector), spatial groups
    (4, (1, 2, 2), 7, 6, (3, 3), 4),        # 16 columns
    (3, (1, 2, 3), 9, 10, (3,), 13),        # 18 columns, 1-d kernels
    (8, (1, 3, 3), 4, 4, (3, 3), 3),        # 72 columns
    (2, (2, 2, 2), 3, 2, (3, 3, 3), 6),     # 16 columns, 3-d kernels
    (16, (1, 2, 4), 2, 3, (1, 1), 5),       # 128 columns, the widest
    (1, (1, 1, 1), 300, 7, (1, 1), 3),      # rows span several chunks
])
def test_native_assembly_matches_the_product(lib, B, groups, c_o, c_i, ck, n):
    torch.manual_seed(0)
    M = groups[0] * groups[1] * groups[2]
    k = torch.Size(ck).numel()
    wt = torch.randn(c_o * c_i * k, n)
    attention = torch.randn(B, M, n)
    kernel = torch.full((B, groups[1], c_o, groups[2], c_i, groups[0]) + ck, float('nan'))
    assert native.kw_assemble_into(kernel, wt, attention, groups)
    ref = _reference(wt, attention, groups, c_o, c_i, ck)
    torch.testing.assert_close(kernel.double(), ref, rtol=1e-5, atol=1e-5)  # every entry written


@pytest.mark.parametrize('B,groups,c_o,c_i,ck,n', [
    (1, (1, 1, 1), 8, 8, (3, 3), 5),        # one column, one vector of cells
    (2, (1, 2, 2), 5, 3, (1, 1), 17),       # rows not a multiple of the tile, two vectors
    (3, (1, 2, 3), 9, 10, (3,), 40),        # three vectors (one register block)
    (8, (1, 3, 3), 4, 4, (3, 3), 70),       # 72 columns, five vectors (padded to blocks of two)
    (2, (2, 2, 2), 3, 2, (3, 3, 3), 256),   # the most cells
    (16, (1, 2, 4), 2, 3, (1, 1), 9),       # 128 columns
    (1, (1, 1, 1), 300, 7, (1, 1), 3),      # rows span several chunks
])
@pytest.mark.parametrize('accumulate', [False, True])
def test_native_backward_matches_the_products(lib, B, groups, c_o, c_i, ck, n, accumulate):
    torch.manual_seed(0)
    M = groups[0] * groups[1] * groups[2]
    k = torch.Size(ck).numel()
    wt = torch.randn(c_o * c_i * k, n)
    attention = torch.randn(B, M, n)
    grad = torch.randn((B, groups[1], c_o, groups[2], c_i, groups[0]) + ck)
    start = torch.randn_like(wt)
    grad_w = start.clone()
    done, grad_a = native.kw_assemble_backward(grad, wt, attention, groups, grad_w, accumulate, True)
    assert done
    # the kernel gradient laid out as the product's output (rows, B * M), in float64
    d = len(ck)
    g = grad.double().permute((2, 4) + tuple(range(6, 6 + d)) + (0, 5, 1, 3)).reshape(wt.shape[0], B * M)
    ref_w = g @ attention.double().reshape(B * M, n) + (start.double() if accumulate else 0)
    ref_a = (g.t() @ wt.double()).reshape(B, M, n)
    torch.testing.assert_close(grad_w.double(), ref_w, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad_a.double(), ref_a, rtol=1e-5, atol=1e-4)
    # either gradient alone
    only_w = torch.full_like(wt, float('nan'))
    assert native.kw_assemble_backward(grad, wt, attention, groups, only_w, False, False) == (True, None)
    torch.testing.assert_close(only_w, grad_w - (start if accumulate else 0), rtol=1e-5, atol=1e-4)
    done, only_a = native.kw_assemble_backward(grad, wt, attention, groups, None, False, True)
    assert done and torch.equal(only_a, grad_a)


def test_native_backward_declines_what_it_does_not_cover(lib):
    wt, grad_w = torch.randn(16, 3), torch.zeros(16, 3)
    grad = torch.randn(17, 1, 4, 1, 4, 8, 1, 1)
    assert native.kw_assemble_backward(grad, wt, torch.randn(17, 8, 3), (8, 1, 1), grad_w, False, True) == (
        False, None)  # 136 columns
    big = torch.randn(16, 257)
    assert not native.kw_assemble_backward(grad[:1], big, torch.randn(1, 8, 257), (8, 1, 1), None, False, True)[0]
    assert not native.kw_assemble_backward(grad[:1].transpose(2, 4), wt, torch.randn(1, 8, 3), (8, 1, 1), grad_w,
                                           False, True)[0]
    assert not native.kw_assemble_backward(grad[:1], wt, torch.randn(1, 8, 3), (8, 1, 1), grad_w.t().contiguous().t(),
                                           False, True)[0]
    assert not native.kw_assemble_backward(grad[:1], wt, torch.randn(1, 8, 3), (8, 1, 1), None, False, False)[0]
    assert grad_w.eq(0).all()


def test_native_assembly_is_the_same_for_any_thread_count(lib):
    torch.manual_seed(0)
    wt, attention = torch.randn(64 * 64 * 9, 20), torch.randn(1, 9, 20)

    def assemble():
        kernel = torch.empty(1, 1, 64, 1, 64, 9, 3, 3)
        assert native.kw_assemble_into(kernel, wt, attention, (9, 1, 1))
        return kernel

    out = at_thread_counts(assemble)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])  # one thread per row: no reordering


def test_native_assembly_declines_what_it_does_not_cover(lib):
    wt, kernel = torch.randn(4 * 4, 3), torch.zeros(17, 1, 4, 1, 4, 8, 1, 1)
    assert not native.kw_assemble_into(kernel, wt, torch.randn(17, 8, 3), (8, 1, 1))  # 136 columns
    assert not native.kw_assemble_into(kernel[:1].double(), wt.double(), torch.randn(1, 8, 3).double(), (8, 1, 1))
    assert not native.kw_assemble_into(kernel[:1].transpose(2, 4), wt, torch.randn(1, 8, 3), (8, 1, 1))
    assert not native.kw_assemble_into(kernel[:1], wt.t().contiguous().t(), torch.randn(1, 8, 3), (8, 1, 1))
    assert not native.kw_assemble_into(kernel[:1], wt[:-1], torch.randn(1, 8, 3), (8, 1, 1))  # wrong rows
    assert kernel.eq(0).all()  # nothing written


@pytest.mark.parametrize('batch', [1, 4])
def test_kw_layer_forward_and_gradients_with_and_without_native(lib, monkeypatch, batch):
    """A float32 KW layer on the blocked path: the native forward and backward give the PyTorch paths'
    numbers (to float32 rounding); the official-style reference agrees."""
    monkeypatch.setattr(kw, 'BLOCKED_ASSEMBLY_MIN_CELLS', 0)
    torch.manual_seed(0)
    block = KWLayerBlock(16, 32, 3, 1.0, padding=1)
    dynconv_mm.set_temperature(block, 0.4)
    x = torch.randn(batch, 16, 8, 8, requires_grad=True)
    layer = block.conv
    calls, backward_calls = [], []
    real, real_backward = kw.kw_assemble_into, kw.kw_assemble_backward

    def spy_backward(*args, **kwargs):
        result = real_backward(*args, **kwargs)
        backward_calls.append(result[0])
        return result

    monkeypatch.setattr(kw, 'kw_assemble_into', lambda *a: calls.append(real(*a)) or calls[-1])
    monkeypatch.setattr(kw, 'kw_assemble_backward', spy_backward)
    params = [x] + list(block.parameters())

    def run():
        out = block(x)
        return out, torch.autograd.grad(out.square().sum(), params)

    out, grads = run()
    assert calls == [True] and backward_calls == [True]
    monkeypatch.setenv('DYNCONV_MM_NATIVE', '0')
    ref_out, ref_grads = run()
    assert calls == [True, False] and backward_calls == [True, False]
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(out, reference_forward(layer, x), rtol=1e-5, atol=1e-5)


def test_native_off_by_environment(monkeypatch):
    monkeypatch.setattr(native, '_state', {})
    monkeypatch.setenv('DYNCONV_MM_NATIVE', '0')
    assert native.native_library() is None
    assert native.native_status() == 'off (DYNCONV_MM_NATIVE=0)'
    kernel = torch.zeros(1, 1, 2, 1, 2, 1, 1, 1)
    assert not native.kw_assemble_into(kernel, torch.randn(4, 3), torch.randn(1, 1, 3), (1, 1, 1))


def test_without_a_compiler_the_pytorch_path_runs_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setattr(native, '_state', {})
    monkeypatch.setenv('DYNCONV_MM_CACHE', str(tmp_path))
    monkeypatch.setenv('CC', str(tmp_path / 'no-such-cc'))
    with pytest.warns(RuntimeWarning, match='no C compiler found'):
        assert native.native_library() is None
    assert native.native_status().startswith('unavailable: no C compiler found')
    # a KW layer on the blocked path still gives the reference's numbers
    monkeypatch.setattr(kw, 'BLOCKED_ASSEMBLY_MIN_CELLS', 0)
    torch.manual_seed(0)
    block = KWLayerBlock(8, 8, 3, 1.0, padding=1)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(block(x), reference_forward(block.conv, x), rtol=1e-5, atol=1e-5)


def test_a_failing_build_falls_back_with_the_compiler_message(monkeypatch, tmp_path):
    fake_cc = tmp_path / 'cc'
    fake_cc.write_text('#!/bin/sh\necho "fatal: this compiler is broken" >&2\nexit 1\n')
    fake_cc.chmod(0o755)
    monkeypatch.setattr(native, '_state', {})
    monkeypatch.setenv('DYNCONV_MM_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setenv('CC', str(fake_cc))
    with pytest.warns(RuntimeWarning, match='this compiler is broken'):
        assert native.native_library() is None


def test_the_build_is_cached(lib, monkeypatch, tmp_path):
    monkeypatch.setenv('DYNCONV_MM_CACHE', str(tmp_path))
    monkeypatch.setattr(native, '_state', {})
    assert native.native_library() is not None
    assert native.native_status().startswith('available: built ')
    built = list((tmp_path / 'native').glob('dynconv_mm_native-*.so'))
    assert len(built) == 1 and not list((tmp_path / 'native').glob('tmp*'))
    monkeypatch.setattr(native, '_state', {})
    assert native.native_status() == f'available: cached {built[0]}'


def test_an_unwritable_cache_falls_back_and_says_where(lib, monkeypatch, tmp_path):
    not_a_dir = tmp_path / 'cache'
    not_a_dir.write_text('a file where the cache folder should be')
    monkeypatch.setattr(native, '_state', {})
    monkeypatch.setenv('DYNCONV_MM_CACHE', str(not_a_dir))
    with pytest.warns(RuntimeWarning, match='cannot write the kernel cache .*set DYNCONV_MM_CACHE'):
        assert native.native_library() is None


def test_every_source_and_the_header_are_in_the_cache_key(lib, monkeypatch, tmp_path):
    import shutil
    csrc = tmp_path / 'csrc'
    shutil.copytree(native._CSRC, csrc)
    monkeypatch.setattr(native, '_CSRC', str(csrc))
    monkeypatch.setenv('DYNCONV_MM_CACHE', str(tmp_path / 'cache'))
    built = set()
    for edited in (None, 'common.h', 'dynamic_dw.c'):
        if edited is not None:
            with open(csrc / edited, 'a') as f:
                f.write('\n/* edited */\n')
        monkeypatch.setattr(native, '_state', {})
        assert native.native_library() is not None
        assert native.native_status().startswith('available: built ')
        built.add(native.native_status().split()[2])
    assert len(built) == 3
