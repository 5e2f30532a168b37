"""Benchmark library: the official-style references compute what our layers (and the official code)
compute, the per-sample convolution paths agree, the harness measures and reports, every dynamic
layer and a KW backbone compile without graph breaks. No timing assertions."""
import ast
import json
import os
import time

import pytest
import torch
from torch import nn

import dynconv_mm
from dynconv_mm.backbones.kw_resnet import KWResNet
from dynconv_mm.benchmark import (
    BenchmarkCase,
    BenchmarkOptions,
    KWLayerBlock,
    get_cases,
    markdown_report,
    measure_peak_memory,
    measure_time,
    mixed_parameter_reads,
    read_bandwidth,
    reference_forward,
    run_benchmark,
    run_case,
    use_reference,
    write_reports,
)
from dynconv_mm.benchmark.macs import count_macs
from dynconv_mm.benchmark.reference import folded_conv
from dynconv_mm.layers import CondConv2d, DyConv2d, DynamicDWConv2d, ODConv2d, PEDConv2d
from dynconv_mm.layers.batched import batched_conv, reference_batched_conv, resolve_impl


def close(a, b, rtol=1e-5):
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item())


def _randomize_norms(model):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


# ------------------------------------------------------------------------------------------------
# references
def _dynamic_layers():
    torch.manual_seed(0)
    return {
        'odconv': ODConv2d(8, 12, 3, stride=2, padding=1, groups=2, num_experts=4),
        'odconv_1x1': ODConv2d(8, 12, 1, num_experts=4),
        'dyconv': DyConv2d(8, 12, 3, padding=1, bias=True, temperature=3.0),
        'condconv': CondConv2d(8, 12, 3, padding=1, bias=True, num_experts=4),
        'pedconv': PEDConv2d(8, 12, 3, padding=1, stride=2, aux_loss_weight=0.0),
        'dynamic_dw': DynamicDWConv2d(8, 8, 5, reduction=2),
    }


@pytest.mark.parametrize('name', list(_dynamic_layers()))
@pytest.mark.parametrize('batch', [1, 3])
def test_reference_matches_our_layers(name, batch):
    layer = _dynamic_layers()[name]
    _randomize_norms(layer)
    layer.eval()
    x = torch.randn(batch, 8, 9, 9)
    with torch.no_grad():
        ours = layer(x)
        ref = reference_forward(layer, x)
    close(ours, ref)


def _explicit_kw_kernel(layer, x):
    """Per-sample KW kernel built entry by entry from the paper's definition (index loops)."""
    B = x.shape[0]
    alpha = layer.attention(x)
    cells = layer.manager.weights[layer.warehouse_id]
    n, c_o, c_i = cells.shape[:3]
    G_o, G_i = layer.groups_out_channel, layer.groups_in_channel
    kh, kw = layer.kernel_size
    W = torch.zeros(B, layer.out_planes, layer.in_planes // layer.groups, kh, kw)
    for b in range(B):
        for s in range(kh * kw):
            for o in range(G_o):
                for i in range(G_i):
                    m = (s * G_o + o) * G_i + i
                    mix = torch.einsum('j,jpq->pq', alpha[b, m], cells[:, :, :, 0, 0])
                    W[b, o * c_o:(o + 1) * c_o, i * c_i:(i + 1) * c_i, s // kw, s % kw] = mix
    return W


@pytest.mark.parametrize('ratio,kernel,cin,cout,groups', [(1.0, 3, 8, 8, 1), (4.0, 3, 8, 16, 1),
                                                          (1.0, 1, 8, 16, 1), (1.0, 3, 8, 8, 8)])
def test_kw_reference_is_the_paper_kernel(ratio, kernel, cin, cout, groups):
    """The official-style KW forward equals the kernel written out from the mixture index rule
    ``m = (s * G_o + o) * G_i + i`` followed by a per-sample loop of plain convolutions, and our layer."""
    torch.manual_seed(0)
    block = KWLayerBlock(cin, cout, kernel, ratio, padding=kernel // 2, groups=groups)
    layer = block.conv
    dynconv_mm.set_temperature(block, 0.3)  # the temperature prior is part of the computation
    _randomize_norms(block)
    block.eval()
    x = torch.randn(3, cin, 6, 6)
    with torch.no_grad():
        W = _explicit_kw_kernel(layer, x)
        expected = reference_batched_conv(x, W, None, 1, kernel // 2, 1, groups)
        close(reference_forward(layer, x), expected)
        close(block(x), expected)


def test_reference_reproduces_official_kw_logits(golden):
    """Official-style forward in a whole KW ResNet (1/2x: basis attention, non-zero start cells) gives
    the official code's logits from the golden fixture."""
    from dynconv_mm.converters.kernelwarehouse import convert_kernelwarehouse
    ref = golden('kw_resnet_bottleneck_1111_kw1d2x.pt')
    call = ast.parse(ref['constructor'], mode='eval').body
    block, layers = [a.id if isinstance(a, ast.Name) else ast.literal_eval(a) for a in call.args]
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    num_classes = kw.pop('num_classes', 1000)
    kw.pop('dropout', None)
    assert block == 'Bottleneck'

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = KWResNet(depth=50, stage_blocks=layers, **kw)
            self.head = nn.Module()
            self.head.fc = nn.Linear(2048, num_classes)

        def forward(self, x):
            return self.head.fc(self.backbone(x)[-1].mean((2, 3)))

    model = Classifier()
    sd, report = convert_kernelwarehouse(ref['state_dict'], model_keys=model.state_dict())
    report.check()
    model.load_state_dict(sd, strict=True)
    model.eval()
    for temperature, expected in ref['outputs'].items():
        dynconv_mm.set_temperature(model, temperature)
        with torch.no_grad(), use_reference(model) as swapped:
            out = model(ref['input'])
        assert swapped > 10
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_use_reference_swaps_and_restores():
    torch.manual_seed(0)
    model = KWResNet(depth=18, stage_blocks=(1, 1, 1, 1), base_channels=8)
    layer = model.layer1[0].conv1
    calls = []
    handle = layer.register_forward_hook(lambda *a: calls.append(1))
    with use_reference(model) as n:
        assert n == sum(1 for m in model.modules() if isinstance(m, dynconv_mm.layers.KWConvNd))
        assert 'forward' in vars(layer)
    assert 'forward' not in vars(layer)
    handle.remove()
    with pytest.raises(TypeError, match='no official-style forward'):
        reference_forward(nn.Conv2d(2, 2, 1), torch.randn(1, 2, 3, 3))


def test_kw_backbone_train_step_matches_reference():
    """Training mode (batch statistics, batch > 1): same outputs and same warehouse gradients. In
    float64: train-mode batch norms over a few values amplify float32 rounding differences (1e-4 after
    four stages), which would hide a real discrepancy behind a loose bound."""
    torch.manual_seed(0)
    model = KWResNet(depth=50, stage_blocks=(1, 1, 1, 1), base_channels=8, cell_num_ratio=4).double()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    out = model(x)[-1]
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.warehouse_manager.parameters()]
    model.zero_grad()
    with use_reference(model):
        ref = model(x)[-1]
    ref.square().sum().backward()
    close(out, ref, rtol=1e-10)
    for g, p in zip(grads, model.warehouse_manager.parameters()):
        close(g, p.grad, rtol=1e-10)


# ------------------------------------------------------------------------------------------------
# per-sample convolution paths
@pytest.mark.parametrize('ndim,stride,groups', [(2, 1, 1), (2, 2, 2), (1, 2, 1), (3, 1, 2)])
def test_matmul_path_matches_reference(ndim, stride, groups):
    torch.manual_seed(0)
    x = torch.randn(3, 4, *([5] * ndim), dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 6, 4 // groups, *([1] * ndim), dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, 6, dtype=torch.float64)
    out = batched_conv(x, w, bias, stride, 0, 1, groups, impl='matmul')
    ref = reference_batched_conv(x, w, bias, stride, 0, 1, groups)
    close(out, ref, rtol=1e-10)
    assert torch.autograd.gradcheck(lambda a, b: batched_conv(a, b, None, stride, 0, 1, groups, impl='matmul'),
                                    (x, w), fast_mode=True)


def test_auto_takes_matmul_for_pointwise_kernels_only():
    x = torch.randn(4, 2, 5, 5)
    assert resolve_impl('auto', x, 4, 2, (1, 1), (0, 0)) == 'matmul'
    assert resolve_impl('auto', x, 4, 2, (3, 3), (1, 1)) == 'grouped'
    assert resolve_impl('auto', x, 4, 2, (1, 1), (1, 1)) == 'grouped'  # padded 1x1
    assert resolve_impl('auto', x, 1, 2, (1, 1), (0, 0)) == 'single'
    with pytest.raises(ValueError, match='point-wise'):
        batched_conv(x, torch.randn(4, 3, 2, 3, 3), impl='matmul')


def test_folded_conv_is_per_sample_conv():
    torch.manual_seed(0)
    x, w = torch.randn(3, 4, 6, 6), torch.randn(3, 6, 2, 3, 3)
    close(folded_conv(x, w.reshape(18, 2, 3, 3), 1, 1, 1, 2), reference_batched_conv(x, w, None, 1, 1, 1, 2))


# ------------------------------------------------------------------------------------------------
# harness
def test_count_macs_is_analytic():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    assert count_macs(conv, torch.randn(2, 3, 5, 5)) == dict(conv=4 * 3 * 9 * 25, attention=0, assembly=0,
                                                           total=2700)
    torch.manual_seed(0)
    block = KWLayerBlock(8, 16, 3, 1.0, padding=1)
    layer = block.conv
    n, c_o, c_i = layer.cell_shape[:3]
    macs = count_macs(block.eval(), torch.randn(1, 8, 4, 4))
    assert macs['conv'] == 16 * 8 * 9 * 16
    assert macs['assembly'] == layer.num_mixtures * n * c_o * c_i
    assert macs['attention'] > 8 * 16  # the pooling and the attention's linear layers


def test_measure_time_and_memory():
    calls = []
    t = measure_time(lambda: calls.append(time.sleep(0.001)), warmup=2, repeats=3)
    assert len(calls) == 5 and len(t.times) == 3 and t.median >= 0.001
    with pytest.raises(ValueError):
        measure_time(lambda: None, repeats=0)

    def allocate():
        buf = torch.ones(16 * 2**20)  # 64 MiB
        time.sleep(0.05)
        return buf.sum()
    peak = measure_peak_memory(allocate)
    assert 32 * 2**20 < peak < 1024 * 2**20


_RSS_AFTER_FREE = '''
import sys, torch
from dynconv_mm.benchmark.timing import _rss, keep_freed_memory
if sys.argv[1] == 'keep':
    assert keep_freed_memory()
before = _rss()
t = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, written
del t
print((_rss() - before) >> 20)
'''


def _glibc_linux() -> bool:
    try:
        return os.path.exists('/proc/self/statm') and os.confstr('CS_GNU_LIBC_VERSION').startswith('glibc')
    except (AttributeError, ValueError, OSError):
        return False


@pytest.mark.skipif(not _glibc_linux(), reason='needs Linux with glibc (mallopt, /proc/self/statm)')
def test_keep_freed_memory_keeps_freed_blocks():
    """With ``--malloc keep`` a freed 64 MiB block stays resident for reuse; by default glibc returns it."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')}  # glibc's own defaults
    kept = {}
    for mode in ('default', 'keep'):
        out = subprocess.run([sys.executable, '-c', _RSS_AFTER_FREE, mode], capture_output=True, text=True,
                             check=True, env=env)
        kept[mode] = int(out.stdout.strip().splitlines()[-1])
    assert kept['default'] < 16 and kept['keep'] >= 60, kept


def test_kw_resnet50_reads_its_warehouses_once_per_layer():
    """KW1x ResNet-50 reads 296 M warehouse floats per forward: every KW layer reads its whole warehouse."""
    model = get_cases(['kw1x-resnet50'])[0].build()
    assert mixed_parameter_reads(model) / 4 == pytest.approx(296.1e6, rel=1e-3)
    assert mixed_parameter_reads(nn.Conv2d(3, 3, 3)) == 0


def test_read_bandwidth_is_bytes_per_second():
    assert 1e8 < read_bandwidth(nbytes=16 << 20, repeats=2) < 1e13


def test_environment_records_the_native_kernels(monkeypatch):
    from dynconv_mm.benchmark.runner import environment
    from dynconv_mm.layers.native import native_status
    assert environment(BenchmarkOptions())['native'] == native_status()
    monkeypatch.setenv('DYNCONV_MM_NATIVE', '0')
    assert environment(BenchmarkOptions())['native'] == 'off (DYNCONV_MM_NATIVE=0)'


def test_malloc_option_is_checked():
    with pytest.raises(ValueError, match="malloc must be 'default' or 'keep'"):
        run_benchmark([], BenchmarkOptions(malloc='fresh'))


def test_measure_interleaved_rotates_and_counts():
    from dynconv_mm.benchmark.timing import measure_interleaved
    order = []
    fns = {name: (lambda name=name: order.append(name)) for name in 'abc'}
    times = measure_interleaved(fns, warmup=1, repeats=3)
    assert order[:3] == ['a', 'b', 'c']  # warm-up
    assert order[3:] == ['a', 'b', 'c', 'b', 'c', 'a', 'c', 'a', 'b']  # rounds in rotating order
    assert all(len(t.times) == 3 for t in times.values())
    # min_time: a fast function gets more runs, every function at least `repeats`
    slow = measure_interleaved({'slow': lambda: time.sleep(0.002), 'fast': lambda: None}, repeats=2,
                               min_time=0.01, max_repeats=50)
    assert len(slow['slow'].times) >= 5 and len(slow['fast'].times) == len(slow['slow'].times)
    with pytest.raises(ValueError):
        measure_interleaved(fns, repeats=0)


def test_get_cases_selection():
    names = [c.name for c in get_cases(['kw1x-resnet*', 'ODConv2d'])]
    assert names == ['kw1x-resnet18', 'kw1x-resnet50', 'ODConv2d']
    assert all(c.kind == 'layer' for c in get_cases(['layers']))
    with pytest.raises(ValueError, match='no benchmark case'):
        get_cases(['nope'])


def test_deployed_layer_twins_are_the_deployed_network():
    """A deployed re-param layer's twin is its plain network (same bias, same activation): loaded with the
    deployed kernel it gives the deployed layer's outputs."""
    cases = [c for c in get_cases(['layers']) if c.deploy]
    assert {c.name for c in cases} == {'OREPA-deploy', 'DBB-deploy', 'RepVGGBlock-deploy', 'DOConv2d-deploy'}
    for case in cases:
        layer, twin = case.build().eval(), case.build_twin().eval()
        conv = twin[0] if isinstance(twin, nn.Sequential) else twin
        assert (conv.bias is None) == (layer.reparam.bias is None), case.name
        conv.load_state_dict(layer.reparam.state_dict())
        x = torch.randn(2, case.in_channels, 9, 9)
        with torch.no_grad():
            close(twin(x), layer(x))


def test_run_case_and_reports(tmp_path):
    case = BenchmarkCase('tiny-kw', 'layer', lambda: KWLayerBlock(8, 8, 3, 1.0, padding=1),
                         lambda: nn.Conv2d(8, 8, 3, padding=1, bias=False), 8, 8, train_batch=2)
    options = BenchmarkOptions(repeats=1, warmup=0, sweep=(1, 2), amp=True)
    result = run_case(case, options, log=lambda s: None).to_dict()
    assert result['max_rel_diff'] < 1e-5
    assert set(result['times']) == {'ours', 'reference', 'twin', 'ours+bf16'}
    for variant in ('ours', 'reference', 'twin'):
        assert set(result['times'][variant]) == {'train', 'fwd', 'fwd1'}
        assert all(v > 0 for v in result['times'][variant].values())
    assert set(result['ratios']) == {'ours/twin', 'reference/ours'}
    assert result['macs']['assembly'] > 0 and result['floor']['arithmetic_ratio'] > 1
    layer = KWLayerBlock(8, 8, 3, 1.0, padding=1)
    assert result['floor']['warehouse_mb'] == pytest.approx(layer.warehouse_manager.weights[0].numel() * 4 / 2 ** 20)
    assert result['floor']['read_gbps'] > 0
    for mode in ('fwd', 'fwd1'):  # ours over (twin + warehouse reads at the measured bandwidth)
        bw_floor = result['times']['twin'][mode] + result['floor']['warehouse_mb'] * 2 ** 20 / (
            result['floor']['read_gbps'] * 1e9)
        assert result['floor'][f'{mode}_vs_bw_floor'] == pytest.approx(result['times']['ours'][mode] / bw_floor)
    assert set(result['sweep']['ours']) == {'1', '2'}
    data = dict(environment={'device': 'cpu'}, options={'repeats': 1}, results=[result])
    paths = write_reports(data, str(tmp_path))
    assert json.load(open(paths['json']))['results'][0]['name'] == 'tiny-kw'
    md = open(paths['markdown']).read()
    assert '| tiny-kw |' in md and 'Distance from the floor' in md and 'bs1/bw floor' in md
    assert 'Measured read bandwidth:' in md
    assert os.path.getsize(paths['plot']) > 1000
    assert 'failed' in markdown_report(dict(environment={}, options={}, results=[
        dict(name='broken', kind='model', errors={'case': 'RuntimeError: x'})]))


def test_cli_list_and_bad_pattern(capsys):
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), '..', '..', 'tools', 'benchmark', 'benchmark.py')
    spec = importlib.util.spec_from_file_location('benchmark_cli', path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(['--list', '--models', 'layers']) == 0
    assert 'KWConv2d-1x' in capsys.readouterr().out
    assert cli.main(['--models', 'does-not-exist']) == 2


# ------------------------------------------------------------------------------------------------
# torch.compile: no graph breaks
def _compile_cases():
    layers = _dynamic_layers()
    layers['kw'] = KWLayerBlock(8, 8, 3, 1.0, padding=1)
    layers['kw_1x1'] = KWLayerBlock(8, 16, 1, 1.0)
    return layers


@pytest.mark.parametrize('name', list(_compile_cases()))
@pytest.mark.parametrize('train', [False, True])
def test_layers_compile_fullgraph(name, train):
    torch._dynamo.reset()
    layer = _compile_cases()[name].train(train)
    x = torch.randn(3, 8, 9, 9)
    if train and name == 'pedconv':
        layer.attn.noise_std = 0.0  # deterministic for the comparison
    torch.manual_seed(0)
    expected = layer(x)
    compiled = torch.compile(layer, fullgraph=True, backend='eager')
    torch.manual_seed(0)
    close(compiled(x), expected)


def test_kw_backbone_has_no_graph_breaks():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = KWResNet(depth=50, stage_blocks=(1, 1, 1, 1), base_channels=8).eval()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
