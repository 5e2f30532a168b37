"""KernelWarehouse layers against an independent per-sample reference, golden fixtures and the
official warehouse sizes."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynconv_mm.layers.attention import SafeBatchNorm1d
from dynconv_mm.layers.kernel_warehouse import (
    KWConv1d,
    KWConv2d,
    KWConv3d,
    KWConvNd,
    KWLinear,
    WarehouseManager,
    allocate_warehouses,
    normalize_sharing_range,
    path_warehouse_key,
)
from dynconv_mm.layers.temperature import set_temperature
from dynconv_mm.layers.torch_internals import onnx_export_kwargs

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# ---------------------------------------------------------------------------------------------
# independent reference
# ---------------------------------------------------------------------------------------------
def ref_prior(M, P, start, ratio):
    """Temperature prior (M, P) and the next free cell, straight from the paper's rule."""
    t = torch.zeros(M, P, dtype=torch.float64)
    c = start
    if ratio >= 1:
        for m in range(M):
            t[m, c] = 1
            c += int(ratio)
        return t, c
    r = int(1.0 / ratio)
    for m in range(M):
        if m % r == (m // r) % r:
            t[m, c] = 1
            c += 1
        else:
            t[m, P - 1] = 1
    return t, c


def ref_hidden(att, x):
    B = x.shape[0]
    pooled = x.reshape(B, x.shape[1], -1).mean(-1)
    h = F.linear(pooled, att.fc1.weight, att.fc1.bias)
    norm = att.norm1
    if isinstance(norm, nn.LayerNorm):
        h = F.layer_norm(h, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    else:
        if norm.training and B > 1:
            mean, var = h.mean(0), h.var(0, unbiased=False)
        else:
            mean, var = norm.running_mean, norm.running_var
        h = (h - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias
    return h.clamp_min(0)


def ref_kw(layer, cells, x, tau, start, ratio, spatial_partition):
    """Per-sample loop: explicit mixtures written into an explicit kernel, then F.convNd."""
    conv = layer.conv if isinstance(layer, KWLinear) else layer
    if isinstance(layer, KWLinear):
        shape = x.shape
        x = x.reshape(shape[0], -1, shape[-1]).transpose(1, 2)
    att = conv.attention
    d = x.dim() - 2
    n, co, ci = cells.shape[:3]
    P = n + 1
    out_c, in_g, k = conv.out_channels, conv.in_channels // conv.groups, conv.kernel_size
    Go, Gi = out_c // co, in_g // ci
    Gs = int(np.prod(k)) if spatial_partition else 1
    M = Gs * Go * Gi
    prior, _ = ref_prior(M, P, start, ratio)
    h = ref_hidden(att, x)
    logits = F.linear(h, att.fc2.weight, att.fc2.bias)
    basis = hasattr(att, 'fc3')
    outs = []
    for b in range(x.shape[0]):
        K = torch.zeros(out_c, in_g, *k, dtype=x.dtype)
        for m in range(M):
            if basis:
                nl, nb = int(ratio * M), att.fc3.weight.shape[1]
                row = logits[b, m * (nl + nb + 1):(m + 1) * (nl + nb + 1)]
                nonloc = att.fc3.weight @ row[nl:nl + nb]
                vec = torch.cat([nonloc[:start], row[:nl], nonloc[start:], row[-1:]])
                vec = vec + att.basis_bias[m * P:(m + 1) * P]
            else:
                vec = logits[b, m * P:(m + 1) * P]
            z = vec / (vec.abs().sum() + 1e-3)
            a = (1 - tau) * z + tau * prior[m].to(z.dtype)
            Wm = sum(a[j] * cells[j] for j in range(n))
            s, rem = divmod(m, Go * Gi)
            o, i = divmod(rem, Gi)
            block = K[o * co:(o + 1) * co, i * ci:(i + 1) * ci]
            if spatial_partition:
                pos = np.unravel_index(s, k)
                block[(slice(None), slice(None)) + tuple(int(p) for p in pos)] = Wm.reshape(co, ci)
            else:
                block[...] = Wm
        outs.append(CONV[d](x[b:b + 1], K, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups))
    y = torch.cat(outs)
    if isinstance(layer, KWLinear):
        y = y.transpose(1, 2).reshape(*shape[:-1], -1)
    return y


class Net(nn.Module):
    """Layers reserved from one manager, in a ModuleList (module order = list order)."""

    def __init__(self, specs, **manager_kw):
        super().__init__()
        self.warehouse_manager = WarehouseManager(**manager_kw)
        self.layers = nn.ModuleList()
        for spec in specs:
            spec = dict(spec)
            self.layers.append(self.warehouse_manager.reserve(**spec))
        self.warehouse_manager.store()
        self.warehouse_manager.allocate(self)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def randomize(net, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if 'warehouse' in name else 0.3))
        for name, b in net.named_buffers():
            if name.endswith('running_mean'):
                b.copy_(torch.randn(b.shape, generator=g) * 0.2)
            elif name.endswith('running_var'):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return net.to(dtype)


def starts(net):
    """Independent bookkeeping of each layer's first cell (module order, per warehouse)."""
    ends, out = {}, []
    for layer in net.layers:
        conv = layer.conv if isinstance(layer, KWLinear) else layer
        wid = conv.warehouse_id
        s = ends.get(wid, 0)
        out.append(s)
        cells = net.warehouse_manager.weights[wid]
        ratio = net.warehouse_manager._settings[wid]['cell_num_ratio']
        n, co, ci = cells.shape[:3]
        sp = cells.shape[3:] == (1,) * (cells.dim() - 3)
        M = (conv.out_channels // co) * (conv.in_channels // conv.groups // ci) * (
            int(np.prod(conv.kernel_size)) if sp else 1)
        ends[wid] = ref_prior(M, n + 1, s, ratio)[1]
    return out


def conv_spec(i, o, k=3, layer_type='conv2d', name='stage0_layer0_conv0', **kw):
    return dict(in_planes=i, out_planes=o, kernel_size=k, layer_type=layer_type, warehouse_name=name, **kw)


# (specs, manager kwargs, input shape)
CASES = {
    'dense': ([conv_spec(8, 16, 3, padding=1, bias=False)], {}, (2, 8, 7, 7)),
    'depthwise_stride': ([conv_spec(16, 16, 3, stride=2, padding=1, groups=16)], {}, (2, 16, 9, 9)),
    'grouped_dilated_bias': ([conv_spec(8, 12, 3, padding=2, dilation=2, groups=2, bias=True)], {}, (3, 8, 7, 5)),
    'conv1d': ([conv_spec(6, 8, 5, 'conv1d', stride=2, padding=2)], {}, (2, 6, 11)),
    'conv3d': ([conv_spec(4, 6, 3, 'conv3d', padding=1, bias=True)], {}, (2, 4, 5, 4, 3)),
    'linear': ([conv_spec(12, 10, 1, 'linear', bias=True)], {}, (3, 5, 12)),
    'two_layers_shared_half': ([conv_spec(8, 8, 3, padding=1, name='stage0_layer0_conv0'),
                                conv_spec(8, 8, 3, stride=2, padding=1, name='stage0_layer1_conv1')],
                               dict(cell_num_ratio=0.5, cell_inplane_ratio=0.5, cell_outplane_ratio=0.5,
                                    sharing_range=('layer', 'conv')), (2, 8, 7, 7)),
    'quarter': ([conv_spec(8, 8, 3, padding=1, name='stage0_layer0_conv0'),
                 conv_spec(8, 8, 3, padding=1, name='stage0_layer1_conv1')],
                dict(cell_num_ratio=0.25, cell_inplane_ratio=0.5, cell_outplane_ratio=0.5,
                     sharing_range='layer_conv'), (2, 8, 5, 5)),
    'ratio2_mixed_kernels': ([conv_spec(8, 16, 3, padding=1, name='s_layer0_conv0'),
                              conv_spec(16, 16, 1, name='s_layer1_conv1')],
                             dict(cell_num_ratio=2, sharing_range=('layer', 'conv')), (2, 8, 5, 5)),
    'ratio4': ([conv_spec(8, 8, 3, padding=1)], dict(cell_num_ratio=4), (2, 8, 5, 5)),
    'no_spatial_partition': ([conv_spec(8, 8, 3, padding=1, name='a_conv0'),
                              conv_spec(8, 16, 3, padding=1, name='a_conv1')],
                             dict(spatial_partition=False, sharing_range=('conv',)), (2, 8, 6, 6)),
    'basis': ([conv_spec(8, 8, 3, padding=1, name='stage0_layer0_conv0'),
               conv_spec(8, 8, 3, padding=1, name='stage0_layer1_conv1'),
               conv_spec(8, 8, 1, name='stage0_layer2_conv2')],
              dict(cell_num_ratio=0.5, cell_inplane_ratio=0.5, cell_outplane_ratio=0.5, nonlocal_basis_ratio=0.5,
                   sharing_range=('layer', 'conv')), (2, 8, 5, 5)),
    'layernorm': ([conv_spec(8, 8, 3, padding=1, bias=True)], dict(norm_layer='LN'), (2, 8, 5, 5)),
}


def run_case(name, tau, train, batch=None, dtype=torch.float32):
    specs, kw, shape = CASES[name]
    net = randomize(Net(specs, **kw), dtype)
    net.train(train)
    assert set_temperature(net, tau) == len(specs)
    if batch is not None:
        shape = (batch,) + shape[1:]
    st = starts(net)
    for layer, s in zip(net.layers, st):
        conv = layer.conv if isinstance(layer, KWLinear) else layer
        if isinstance(layer, KWLinear):
            x = torch.randn(*shape[:-1], conv.in_channels, dtype=dtype)
        else:
            x = torch.randn(shape[0], conv.in_channels, *shape[2:], dtype=dtype)
        cells = net.warehouse_manager.weights[conv.warehouse_id]
        setting = net.warehouse_manager._settings[conv.warehouse_id]
        with torch.no_grad():
            ours = layer(x)
            ref = ref_kw(layer, cells, x, tau, s, setting['cell_num_ratio'], setting['spatial_partition'])
        yield ours, ref


@pytest.mark.parametrize('name', sorted(CASES))
@pytest.mark.parametrize('tau', [0.0, 0.7])
def test_matches_reference(name, tau):
    for ours, ref in run_case(name, tau, train=False):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize('name', ['dense', 'basis', 'two_layers_shared_half', 'linear'])
def test_matches_reference_train_mode(name):
    for ours, ref in run_case(name, 0.3, train=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize('name', ['dense', 'depthwise_stride', 'linear'])
@pytest.mark.parametrize('train', [False, True])
def test_batch_of_one(name, train):
    """A training batch of one uses the attention norm's running statistics (no crash)."""
    for ours, ref in run_case(name, 0.0, train=train, batch=1):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_offsets_follow_module_order_and_prior():
    """Reserve order != module order: cells go by module order (the ResNet downsample case)."""
    m = WarehouseManager(sharing_range=('layer', 'conv'))
    down = m.reserve(8, 8, 1, warehouse_name='stage0_layer1_conv0')
    a = m.reserve(8, 8, 3, padding=1, warehouse_name='stage0_layer0_conv0')
    net = nn.Sequential(a, down)
    m.store()
    m.allocate(net)
    assert a.attention.start_cell_idx == 0 and down.attention.start_cell_idx == 9
    prior = down.attention.temp_bias.reshape(1, 11)
    assert prior[0, 9] == 1 and prior.sum() == 1
    assert 'temp_bias' not in ''.join(net.state_dict())


# ---------------------------------------------------------------------------------------------
# gradients, precision
# ---------------------------------------------------------------------------------------------
def test_gradcheck_float64():
    specs = [conv_spec(4, 4, 3, padding=1, name='s_layer0_conv0', bias=True),
             conv_spec(4, 4, 3, padding=1, name='s_layer1_conv1')]
    net = randomize(Net(specs, cell_num_ratio=0.5, cell_inplane_ratio=0.5, cell_outplane_ratio=0.5,
                        sharing_range=('layer', 'conv')), torch.float64).eval()
    set_temperature(net, 0.3)
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    cells = net.warehouse_manager.weights[0].detach().clone().requires_grad_(True)

    def f(x, cells):
        return torch.func.functional_call(net, {'warehouse_manager.weights.0': cells}, (x,))

    assert torch.autograd.gradcheck(f, (x, cells), eps=1e-6, atol=1e-5, fast_mode=True)


def test_bf16_autocast():
    """bf16 autocast on the CPU: norm-relative error vs float32 below 1e-2 (measured ~5e-3; bf16 eps is 3.9e-3)."""
    specs, kw, shape = CASES['two_layers_shared_half']
    net = randomize(Net(specs, **kw)).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        ref = net(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = net(x)
    assert out.dtype == torch.bfloat16
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 1e-2, rel


def test_backward_reaches_everything():
    specs, kw, shape = CASES['basis']
    net = Net(specs, **kw).train()
    x = torch.randn(shape)
    y = x
    for layer in net.layers:
        y = layer(y)
    y.square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert net.warehouse_manager.weights[0].grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# structure and state dict
# ---------------------------------------------------------------------------------------------
def test_manager_registered_once():
    specs, kw, _ = CASES['two_layers_shared_half']
    net = Net(specs, **kw)
    keys = list(net.state_dict())
    assert [k for k in keys if 'weights' in k] == ['warehouse_manager.weights.0']
    assert all('warehouse_manager' not in name for name, _ in net.layers.named_modules())
    assert net.layers[0].manager is net.warehouse_manager
    assert not any(k.endswith('temp_bias') for k in keys)  # derived from the allocation, never saved
    assert sum(k.endswith('attention.temperature') for k in keys) == 2  # what the layers compute with
    # a fresh net loads the state dict strictly and computes the same thing
    other = Net(specs, **kw).eval()
    net.eval()
    other.load_state_dict(net.state_dict())
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(other.layers[0](x), net.layers[0](x))


def test_disabled_layers_are_plain():
    m = WarehouseManager()
    assert type(m.reserve(4, 8, 3, enabled=False)) is nn.Conv2d
    assert type(m.reserve(4, 8, 3, enabled=False, layer_type='conv1d')) is nn.Conv1d
    assert type(m.reserve(4, 8, 3, enabled=False, layer_type='conv3d')) is nn.Conv3d
    lin = m.reserve(4, 8, enabled=False, layer_type='linear')
    assert type(lin) is nn.Linear and lin.bias is not None
    assert m.num_warehouses == 0


def test_attention_layout_matches_official_keys():
    """fc1 has no bias with BN and a bias with LN; basis mode has fc3/basis_bias and no fc2 bias."""
    net = Net(CASES['basis'][0], **CASES['basis'][1])
    keys = set(net.layers[0].state_dict())
    assert keys == {'bias', 'attention.fc1.weight', 'attention.norm1.weight', 'attention.norm1.bias',
                    'attention.norm1.running_mean', 'attention.norm1.running_var',
                    'attention.norm1.num_batches_tracked', 'attention.fc2.weight', 'attention.fc3.weight',
                    'attention.basis_bias', 'attention.temperature'}  # the official keys + the temperature
    assert isinstance(net.layers[0].attention.norm1, SafeBatchNorm1d)
    ln = Net(CASES['layernorm'][0], norm_layer=dict(type='LN', eps=1e-6))
    assert set(ln.layers[0].state_dict()) == {'bias', 'attention.fc1.weight', 'attention.fc1.bias',
                                              'attention.norm1.weight', 'attention.norm1.bias',
                                              'attention.fc2.weight', 'attention.fc2.bias', 'attention.temperature'}
    assert ln.layers[0].attention.norm1.eps == 1e-6
    # the official class arguments are accepted too
    assert isinstance(Net(CASES['dense'][0], norm_layer=nn.LayerNorm).layers[0].attention.norm1, nn.LayerNorm)


def test_per_warehouse_options():
    specs = [conv_spec(8, 8, 3, padding=1, name='a'), conv_spec(8, 16, 1, name='b')]
    net = Net(specs, cell_num_ratio=(1, 2), reduction=[0.5, 0.0625], spatial_partition=(True, False))
    w = net.warehouse_manager.weights
    assert tuple(w[0].shape) == (9 * 1, 8, 8, 1, 1)
    assert tuple(w[1].shape) == (2, 16, 8, 1, 1)  # whole 1x1 kernel cells, one mixture, ratio 2
    assert net.layers[0].attention.fc1.out_features == 16 and net.layers[1].attention.fc1.out_features == 16
    with pytest.raises(ValueError, match='3 values but there are 2 warehouses'):
        Net(specs, cell_num_ratio=(1, 2, 3))


# ---------------------------------------------------------------------------------------------
# official warehouse sizes (notes 2.9) and golden models
# ---------------------------------------------------------------------------------------------
def resnet_reservations(block, layers):
    """The official KW ResNet's reservations, in reservation order: (in, out, k, stride, name, enabled)."""
    expansion = 1 if block == 'basic' else 4
    out, inplanes, layer_idx = [], 64, 0
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
        stride = 1 if stage == 0 else 2
        if stride != 1 or inplanes != planes * expansion:
            out.append((inplanes, planes * expansion, 1, stride, f'stage{stage - 1}_layer{layer_idx + 1}_conv0',
                        stride != 1))
        for b in range(blocks):
            handover = b == 0
            s = stride if b == 0 else 1
            li = layer_idx
            if block == 'basic':
                out.append((inplanes, planes, 3, s, f'stage{max(stage - 1 if handover else stage, 0)}_layer{li}_conv0',
                            True))
                li = 0 if handover else li
                out.append((planes, planes, 3, 1, f'stage{stage}_layer{li}_conv1', True))
            else:
                c1 = stage - 1 if handover else stage
                out.append((inplanes, planes, 1, 1, f'stage{c1}_layer{li}_conv0', c1 >= 0))
                li = 0 if handover else li
                out.append((planes, planes, 3, s, f'stage{stage}_layer{li}_conv1', True))
                out.append((planes, planes * 4, 1, 1, f'stage{stage}_layer{li}_conv2', True))
            inplanes = planes * expansion
            layer_idx = 1 if b == 0 else layer_idx + 1
    return out


def planned_shapes(block, layers, **kw):
    m = WarehouseManager(sharing_range=('layer', 'conv'), **kw)
    for i, o, k, s, name, enabled in resnet_reservations(block, layers):
        m.reserve(i, o, k, stride=s, padding=k // 2, bias=False, warehouse_name=name, enabled=enabled)
    return [shape for _, shape in m.plan()]


R18, R50 = ('basic', (2, 2, 2, 2)), ('bottleneck', (3, 4, 6, 3))


@pytest.mark.parametrize('arch,kw,cells,base', [
    (R18, dict(cell_num_ratio=0.25, cell_inplane_ratio=0.5, cell_outplane_ratio=0.5), (56, 47, 47, 27), 32),
    (R18, dict(cell_num_ratio=0.5, cell_inplane_ratio=0.5, cell_outplane_ratio=0.5), (112, 94, 94, 54), 32),
    (R18, dict(cell_num_ratio=1), (56, 47, 47, 27), 64),
    (R18, dict(cell_num_ratio=2), (112, 94, 94, 54), 64),
    (R18, dict(cell_num_ratio=4), (224, 188, 188, 108), 64),
    (R50, dict(cell_num_ratio=0.5, cell_inplane_ratio=0.5, cell_outplane_ratio=0.5, nonlocal_basis_ratio=0.0625),
     (174, 208, 276, 94), 32),
    (R50, dict(cell_num_ratio=1), (87, 104, 138, 47), 64),
    (R50, dict(cell_num_ratio=4), (348, 416, 552, 188), 64),
])
def test_official_warehouse_sizes(arch, kw, cells, base):
    shapes = planned_shapes(*arch, **kw)
    assert shapes == [(n, base * 2 ** i, base * 2 ** i, 1, 1) for i, n in enumerate(cells)]


def test_official_ratio_that_does_not_tile_fails_at_store():
    """The official code asserts in allocate() for R18 with cell_num_ratio 0.25 and full-size cells."""
    with pytest.raises(ValueError, match=r"warehouse 'stage\d_layer_conv'.*cell_num_ratio=0.25"):
        planned_shapes(*R18, cell_num_ratio=0.25)


class _Basic(nn.Module):
    def __init__(self, m, inplanes, planes, stride, down, stage, li, handover):
        super().__init__()
        self.conv1 = m.reserve(inplanes, planes, 3, stride=stride, padding=1, bias=False,
                               warehouse_name=f'stage{max(stage - 1 if handover else stage, 0)}_layer{li}_conv0')
        self.bn1 = nn.BatchNorm2d(planes)
        li = 0 if handover else li
        self.conv2 = m.reserve(planes, planes, 3, padding=1, bias=False, warehouse_name=f'stage{stage}_layer{li}_conv1')
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = down

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class _Bottleneck(nn.Module):
    def __init__(self, m, inplanes, planes, stride, down, stage, li, handover):
        super().__init__()
        c1 = stage - 1 if handover else stage
        self.conv1 = m.reserve(inplanes, planes, 1, bias=False, warehouse_name=f'stage{c1}_layer{li}_conv0',
                               enabled=c1 >= 0)
        self.bn1 = nn.BatchNorm2d(planes)
        li = 0 if handover else li
        self.conv2 = m.reserve(planes, planes, 3, stride=stride, padding=1, bias=False,
                               warehouse_name=f'stage{stage}_layer{li}_conv1')
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = m.reserve(planes, planes * 4, 1, bias=False, warehouse_name=f'stage{stage}_layer{li}_conv2')
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = down

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class TinyKWResNet(nn.Module):
    """A compact re-statement of the official KW ResNet layout (names, hand-over, downsample order)."""

    def __init__(self, block, layers, num_classes, **kw):
        super().__init__()
        self.warehouse_manager = m = WarehouseManager(sharing_range=('layer', 'conv'), **kw)
        cls, exp = (_Basic, 1) if block == 'basic' else (_Bottleneck, 4)
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        inplanes, layer_idx = 64, 0
        for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if stage == 0 else 2
            down = None
            if stride != 1 or inplanes != planes * exp:
                down = nn.Sequential(m.reserve(inplanes, planes * exp, 1, stride=stride, bias=False,
                                               warehouse_name=f'stage{stage - 1}_layer{layer_idx + 1}_conv0',
                                               enabled=stride != 1), nn.BatchNorm2d(planes * exp))
            mods = []
            for b in range(blocks):
                mods.append(cls(m, inplanes, planes, stride if b == 0 else 1, down if b == 0 else None, stage,
                                layer_idx, b == 0))
                inplanes = planes * exp
                layer_idx = 1 if b == 0 else layer_idx + 1
            setattr(self, f'layer{stage + 1}', nn.Sequential(*mods))
        self.fc = nn.Linear(512 * exp, num_classes)
        m.store()
        m.allocate(self)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        for i in range(1, 5):
            x = getattr(self, f'layer{i}')(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize('fixture,block,layers,classes,kw', [
    ('kw_resnet18_kw1d4x.pt', 'basic', (2, 2, 2, 2), 1000,
     dict(cell_num_ratio=0.25, cell_inplane_ratio=0.5, cell_outplane_ratio=0.5)),
    ('kw_resnet_bottleneck_1111_kw1d2x.pt', 'bottleneck', (1, 1, 1, 1), 10,
     dict(cell_num_ratio=0.5, cell_inplane_ratio=0.5, cell_outplane_ratio=0.5)),
])
def test_golden_official_models(golden, fixture, block, layers, classes, kw):
    """Official weights in a re-statement of the official ResNet built on our manager: same logits
    at every temperature (exercises cell offsets, the temperature prior and the mixture order)."""
    g = golden(fixture)
    model = TinyKWResNet(block, layers, classes, **kw)
    model.load_state_dict(g['state_dict'], strict=True)
    assert sum(p.numel() for p in model.parameters()) == g['num_params']
    model.eval()
    for tau, ref in g['outputs'].items():
        set_temperature(model, tau)
        with torch.no_grad():
            out = model(g['input'])
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


# ---------------------------------------------------------------------------------------------
# sharing range
# ---------------------------------------------------------------------------------------------
def official_fuse(name, sharing_range):
    """The official fusion, iterating ``sharing_range`` as given (a string: character by character)."""
    out = []
    for tok in name.split('_'):
        for entry in sharing_range:
            if tok.startswith(entry):
                tok = entry
        out.append(tok)
    return '_'.join(out)


def partition(names, fuse):
    groups = {}
    for n in names:
        groups.setdefault(fuse(n), []).append(n)
    return list(groups.values())


def mobilenet_names():
    names, stage_of = ['stage0_conv0'], [1, 2, 3, 4, 5, 6, 6]
    for row, (reps, stage) in enumerate(zip([1, 2, 3, 4, 3, 3, 1], stage_of)):
        for li in range(reps):
            names += [f'stage{stage}_layer{li}_pwconv0', f'stage{stage}_layer{li}_dwconv0',
                      f'stage{stage}_layer{li}_pwconv1']
    return names + ['stage6_layer1_pwconv1']


def convnext_names():
    names = ['stagestem_conv0']
    for i, d in enumerate([3, 3, 9, 3]):
        if i:
            names.append(f'stage{i}_layerds_conv0')
        for j in range(d):
            names += [f'stage{i}_layer{j}_dwconv0', f'stage{i}_layer{j}_pwconv1', f'stage{i}_layer{j}_pwconv2']
    return names


@pytest.mark.parametrize('names,string,tuple_', [
    ([n for *_, n, _ in resnet_reservations(*R50)], 'layer_conv', ('layer', 'conv')),
    ([n for *_, n, _ in resnet_reservations(*R18)], 'layer_conv', ('layer', 'conv')),
    (mobilenet_names(), 'layer_pwconv', ('layer', 'pwconv')),
    (mobilenet_names(), 'layer', ('layer',)),
    (convnext_names(), 'layer_pwconv', ('layer', 'pwconv')),
])
def test_string_sharing_range_groups_like_official(names, string, tuple_):
    official = partition(names, lambda n: official_fuse(n, string))
    m_str, m_tup = WarehouseManager(sharing_range=string), WarehouseManager(sharing_range=tuple_)
    assert m_str.sharing_range == tuple_
    assert partition(names, m_str.fuse_warehouse_name) == official
    assert partition(names, m_tup.fuse_warehouse_name) == official
    # a tuple of characters (the official tuple("layer")) keeps its meaning
    m_chars = WarehouseManager(sharing_range=tuple(string))
    assert partition(names, m_chars.fuse_warehouse_name) == official


def test_sharing_range_errors():
    with pytest.raises(ValueError, match='non-empty strings'):
        WarehouseManager(sharing_range=('layer', 3))
    with pytest.raises(ValueError, match='non-empty strings'):
        WarehouseManager(sharing_range=('layer', ''))
    with pytest.raises(ValueError, match='sharing_range must be'):
        WarehouseManager(sharing_range=5)
    with pytest.raises(ValueError, match=r"'layer_conv' contains \"_\""):
        WarehouseManager(sharing_range=['layer_conv'])
    assert normalize_sharing_range(None) == () and normalize_sharing_range('layer, conv') == ('layer', 'conv')


# ---------------------------------------------------------------------------------------------
# build-time errors
# ---------------------------------------------------------------------------------------------
def test_build_errors():
    with pytest.raises(ValueError, match=r'KWConv2d\(6, 8, groups=4\).*groups=4'):
        KWConv2d(6, 8, 3, groups=4)
    with pytest.raises(ValueError, match='kernel_size'):
        KWConv2d(4, 4, '3')
    with pytest.raises(ValueError, match='kernel_size'):
        KWConv2d(4, 4, (3, 3, 3))
    with pytest.raises(ValueError, match='padding'):
        KWConv1d(4, 4, 3, padding='same')
    with pytest.raises(ValueError, match='in_channels'):
        KWConv3d(0, 4, 3)
    with pytest.raises(ValueError, match='cell_num_ratio'):
        WarehouseManager(cell_num_ratio=-1)
    with pytest.raises(ValueError, match='reduction'):
        WarehouseManager(reduction='a')
    with pytest.raises(ValueError, match='attention norm'):
        WarehouseManager(norm_layer='GN')
    with pytest.raises(ValueError, match='layer_type'):
        WarehouseManager().reserve(4, 4, layer_type='conv4d')
    with pytest.raises(ValueError, match='unknown option'):
        KWConv2d(4, 4, 3, cell_ratio=2)


def test_cells_that_do_not_tile_fail_at_store():
    m = WarehouseManager(cell_inplane_ratio=0.75)
    m.reserve(6, 6, 3, warehouse_name='w')
    with pytest.raises(ValueError, match=r"warehouse 'w'.*cell_inplane_ratio=0.75.*4 input channels.*layer #0"):
        m.store()
    m = WarehouseManager(cell_outplane_ratio=2)
    m.reserve(8, 8, 3, warehouse_name='w')
    with pytest.raises(ValueError, match=r"cell_outplane_ratio=2.*16 output channels"):
        m.store()
    m = WarehouseManager(spatial_partition=False)
    m.reserve(8, 8, 3, warehouse_name='w')
    m.reserve(8, 8, 1, warehouse_name='w')
    with pytest.raises(ValueError, match=r"spatial_partition=False.*layer #1"):
        m.store()


def test_forward_before_allocation_raises():
    m = WarehouseManager()
    conv = m.reserve(4, 4, 3)
    with pytest.raises(RuntimeError, match='store'):
        conv(torch.randn(2, 4, 5, 5))
    with pytest.raises(RuntimeError, match=r'allocate_warehouses\(model\)'):
        KWConv2d(4, 4, 3)(torch.randn(2, 4, 5, 5))


def test_allocate_checks_all_layers_present():
    m = WarehouseManager()
    a = m.reserve(4, 4, 3, warehouse_name='w')
    other = m.reserve(4, 4, 3, warehouse_name='w')  # kept alive, but not in the network
    m.store()
    with pytest.raises(ValueError, match=r"2 layers were reserved in warehouse 'w' but 1 are in the network"):
        m.allocate(nn.Sequential(a))
    m.allocate(nn.Sequential(a, other))


# ---------------------------------------------------------------------------------------------
# conv_cfg path (layers built one by one, warehouses allocated afterwards)
# ---------------------------------------------------------------------------------------------
def build_conv(cfg, *args, **kwargs):
    """mmcv.cnn.build_conv_layer when mmcv is installed, else the same call made directly."""
    try:
        from mmcv.cnn import build_conv_layer
    except ImportError:
        cfg = dict(cfg)
        cls = {'KWConv1d': KWConv1d, 'KWConv2d': KWConv2d, 'KWConv3d': KWConv3d}[cfg.pop('type')]
        return cls(*args, **kwargs, **cfg)
    return build_conv_layer(cfg, *args, **kwargs)


class _Block(nn.Module):
    def __init__(self, cfg, cin, cout, stride=1):
        super().__init__()
        self.conv1 = build_conv(cfg, cin, cout, 3, stride=stride, padding=1, dilation=1, groups=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = build_conv(cfg, cout, cout, 3, stride=1, padding=1, dilation=1, groups=1, bias=False)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(build_conv(cfg, cin, cout, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.conv2(F.relu(self.bn1(self.conv1(x))))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class StockNet(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.conv1 = build_conv(cfg, 3, 8, 3, stride=1, padding=1, bias=False)
        self.layer1 = nn.Sequential(_Block(cfg, 8, 8), _Block(cfg, 8, 8))
        self.layer2 = nn.Sequential(_Block(cfg, 8, 16, 2), _Block(cfg, 16, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.layer2(self.layer1(self.conv1(x)))
        return self.head(x.mean((2, 3)))


def test_conv_cfg_path_allocates_per_stage():
    cfg = dict(type='KWConv2d', cell_num_ratio=1, sharing_range='layer_conv')
    net = StockNet(cfg)
    assert not net.layer1[0].conv1.bound
    manager = allocate_warehouses(net)
    assert manager is net.warehouse_manager
    assert allocate_warehouses(net) is None  # idempotent
    keys = [k for k in net.state_dict() if 'warehouse_manager' in k]
    assert keys == ['warehouse_manager.weights.0', 'warehouse_manager.weights.1', 'warehouse_manager.weights.2']
    # stem alone, layer1 (4 convs), layer2 (4 convs + downsample) in module order
    assert [lay.warehouse_id for lay in (net.conv1, net.layer1[1].conv2, net.layer2[0].conv1,
                                        net.layer2[0].downsample[0])] == [0, 1, 2, 2]
    # cells of 16 out x 8 in channels; mixtures 9 + 18 + 1 (downsample) + 18 + 18
    assert manager.plan()[2][1] == (64, 16, 8, 1, 1)
    assert net.layer2[0].downsample[0].attention.start_cell_idx == 9 + 18  # after conv1, conv2 (module order)
    net.train()
    out = net(torch.randn(2, 3, 8, 8))
    out.sum().backward()
    assert manager.weights[2].grad is not None
    set_temperature(net, 0.5)
    assert float(net.layer2[1].conv2.attention.temperature) == 0.5


def test_conv_cfg_disagreeing_options_name_both_layers():
    net = nn.Module()
    net.layer1 = nn.Sequential(KWConv2d(4, 4, 3, cell_num_ratio=1), KWConv2d(4, 4, 3, cell_num_ratio=2))
    with pytest.raises(ValueError, match=r"'layer1.0' and 'layer1.1'.*cell_num_ratio"):
        allocate_warehouses(net)


def test_conv_cfg_non_tiling_names_warehouse_and_layers():
    net = nn.Module()
    net.layer1 = nn.Sequential(KWConv2d(6, 6, 3, cell_inplane_ratio=0.75), KWConv2d(6, 6, 3, cell_inplane_ratio=0.75))
    with pytest.raises(ValueError, match=r"cell_inplane_ratio=0.75.*layer1.0"):
        allocate_warehouses(net)
    assert not net.layer1[0].bound  # nothing half-done


def test_path_warehouse_key_rule():
    sr = ('layer', 'conv')
    assert path_warehouse_key('layer2.1.conv1', False, sr) == path_warehouse_key('layer2.0.downsample.0', False, sr)
    assert path_warehouse_key('layer2.1.conv1', False, sr) != path_warehouse_key('layer3.1.conv1', False, sr)
    assert path_warehouse_key('layer2.1.conv1', True, sr) != path_warehouse_key('layer2.1.conv2', False, sr)
    assert path_warehouse_key('conv1', False, sr) != path_warehouse_key('layer1.0.conv1', False, sr)
    assert path_warehouse_key('backbone.layer2.1.conv1', False, sr) != path_warehouse_key('neck.convs.0.conv', False,
                                                                                          sr)
    assert path_warehouse_key('layer2.1.conv1', False, ('conv',)) != path_warehouse_key('layer2.0.conv1', False,
                                                                                       ('conv',))
    assert path_warehouse_key('layer2.1.conv1', False, ()) != path_warehouse_key('layer2.1.conv2', False, ())


def test_conv_cfg_through_models_registry():
    """A model built through mmengine's MODELS registry gets its warehouses right after construction."""
    from mmengine.registry import MODELS

    name = 'KWTestStockNet'
    if name not in MODELS.module_dict:
        MODELS.register_module(name=name, module=StockNet)
    net = MODELS.build(dict(type=name, cfg=dict(type='KWConv2d', cell_num_ratio=2)))
    assert isinstance(net.warehouse_manager, WarehouseManager) and net.conv1.bound
    net(torch.randn(2, 3, 8, 8)).sum().backward()


def test_kwlinear_conv_cfg():
    net = nn.Module()
    net.fc = KWLinear(8, 4)
    allocate_warehouses(net)
    assert 'fc.warehouse_manager.weights.0' in net.state_dict()
    assert net.fc(torch.randn(3, 2, 8)).shape == (3, 2, 4)


def test_mmpretrain_resnet_conv_cfg():
    pytest.importorskip('mmcv.cnn', reason='mmcv is not installed')
    mmpretrain = pytest.importorskip('mmpretrain', reason='mmpretrain is not installed')  # noqa: F841
    from mmpretrain.registry import MODELS

    import dynconv_mm  # noqa: F401  (registers the post-build hook in the task scopes)
    from dynconv_mm.registry import register_all_scopes
    register_all_scopes()
    model = MODELS.build(dict(type='ResNet', depth=18, base_channels=8, conv_cfg=dict(type='KWConv2d'),
                              out_indices=(3,)))
    assert isinstance(model.warehouse_manager, WarehouseManager)
    assert isinstance(model.layer2[0].conv1, KWConvNd) and model.layer2[0].conv1.bound
    assert len(model.warehouse_manager.weights) == 5  # stem + one per stage
    model.init_weights()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.warehouse_manager.weights[1].detach().clone()
    out = model(torch.randn(2, 3, 32, 32))[-1]
    out.mean().backward()
    opt.step()
    assert not torch.equal(before, model.warehouse_manager.weights[1])


def test_kernel_assembly_orders():
    """Mixture index = (spatial, out-group, in-group): one-hot attention picks out known cells."""
    m = WarehouseManager(cell_inplane_ratio=0.5, cell_outplane_ratio=0.5)
    conv = m.reserve(4, 4, (1, 2), warehouse_name='w')
    m.store()
    m.allocate(nn.Sequential(conv))
    n = m.weights[0].shape[0]
    assert n == 8  # G_s=2, G_o=2, G_i=2
    alpha = torch.eye(n)[None]  # mixture j takes cell j
    K = conv.assemble_kernel(alpha)[0]
    E = m.weights[0].detach()
    for s, o, i in itertools.product(range(2), range(2), range(2)):
        j = (s * 2 + o) * 2 + i
        torch.testing.assert_close(K[o * 2:(o + 1) * 2, i * 2:(i + 1) * 2, 0, s], E[j, :, :, 0, 0])
    assert math.isclose(float(K.detach().abs().sum()), float(E.abs().sum()), rel_tol=1e-6)


def test_deepcopy_and_pickle_keep_one_warehouse():
    """EMA copies (deepcopy) and whole-model pickles point their layers at their own manager."""
    import copy

    specs, kw, shape = CASES['two_layers_shared_half']
    net = randomize(Net(specs, **kw)).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        before = net(x)
        for clone in (copy.deepcopy(net), _pickled(net)):
            assert clone.layers[0].manager is clone.warehouse_manager
            assert clone.layers[1].manager is clone.warehouse_manager
            torch.testing.assert_close(clone(x), before)
            clone.warehouse_manager.weights[0].zero_()
            assert not torch.allclose(clone(x), before)
            torch.testing.assert_close(net(x), before)


def _pickled(net):
    import io
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_mmcv_conv_module():
    """mmcv's ConvModule (norm, activation, its own init_weights) wraps a KW layer."""
    cnn = pytest.importorskip('mmcv.cnn', reason='mmcv is not installed')
    block = nn.Sequential(cnn.ConvModule(4, 8, 3, padding=1, conv_cfg=dict(type='KWConv2d', cell_num_ratio=2),
                                         norm_cfg=dict(type='BN')),
                          cnn.ConvModule(8, 8, 1, conv_cfg=dict(type='KWConv2d', cell_num_ratio=2), groups=1))
    for m in block:
        m.init_weights()
    manager = allocate_warehouses(block)
    assert manager is not None and isinstance(block[0].conv, KWConv2d) and block[0].conv.bound
    assert block(torch.randn(2, 4, 6, 6)).shape == (2, 8, 6, 6)


def test_conv_cfg_exclude_keeps_layers_plain():
    """A stock ResNet at 1/4x: the stem's own warehouse cannot tile; exclude it by path."""
    cfg = dict(type='KWConv2d', cell_num_ratio=0.25, cell_inplane_ratio=0.5, cell_outplane_ratio=0.5)
    with pytest.raises(ValueError, match=r"warehouse 'stage_layer_conv'.*\['conv1'\]"):
        allocate_warehouses(StockNet(dict(cfg, type='KWConv2d')))
    net = StockNet(dict(cfg, exclude=('conv1', '*.downsample.*')))
    allocate_warehouses(net)
    assert type(net.conv1) is nn.Conv2d and net.conv1.weight.shape == (8, 3, 3, 3)
    assert type(net.layer2[0].downsample[0]) is nn.Conv2d and net.layer2[0].downsample[0].stride == (2, 2)
    assert isinstance(net.layer1[0].conv1, KWConv2d) and net.layer1[0].conv1.bound
    assert len(net.warehouse_manager.weights) == 2
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    with pytest.raises(ValueError, match='exclude'):
        KWConv2d(4, 4, 3, exclude=[1])


def test_official_kw1d2x_classifier_shapes():
    """The official KW1/2x MobileNetV2 classifier: KWLinear(1280 -> 1000) alone in its warehouse."""
    m = WarehouseManager(reduction=0.03125, cell_num_ratio=0.5, cell_inplane_ratio=0.025, cell_outplane_ratio=1)
    head = nn.Sequential(nn.Dropout(0.0), m.reserve(1280, 1000, warehouse_name='classifier', layer_type='linear'))
    m.store()
    m.allocate(head)
    assert tuple(m.weights[0].shape) == (20, 1000, 32, 1)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes['1.conv.attention.fc2.weight'] == (840, 40) and shapes['1.conv.bias'] == (1000,)
    assert head(torch.randn(2, 1280)).shape == (2, 1000)


def test_initialisation_follows_official():
    """Cells: kaiming-normal (fan_out) on each layer's own slice viewed (cells * c_o, c_i, 1, 1);
    attention Linear layers kaiming-normal (fan_out) with zero biases, norm weight 1 and bias 0."""
    torch.manual_seed(3)
    specs = [conv_spec(32, 32, 3, padding=1, name='w'), conv_spec(32, 32, 1, name='w')]
    net = Net(specs, cell_inplane_ratio=0.25, cell_outplane_ratio=0.25)
    cells = net.warehouse_manager.weights[0].detach()
    c_o = cells.shape[1]
    own = [(0, 9 * 16), (9 * 16, 10 * 16)]  # (start, stop) of each layer's cells
    for start, stop in own:
        expected = math.sqrt(2.0 / ((stop - start) * c_o))
        assert abs(cells[start:stop].std().item() / expected - 1) < 0.05
    assert stop == cells.shape[0]
    att = net.layers[0].attention
    assert abs(att.fc2.weight.std().item() / math.sqrt(2.0 / att.fc2.out_features) - 1) < 0.05
    assert torch.equal(att.fc2.bias, torch.zeros_like(att.fc2.bias))
    assert torch.equal(att.norm1.weight, torch.ones(16)) and torch.equal(att.norm1.bias, torch.zeros(16))


def test_onnx_export_keeps_a_dynamic_batch(tmp_path):
    pytest.importorskip('onnx', reason='onnx is not installed')
    ort = pytest.importorskip('onnxruntime', reason='onnxruntime is not installed')
    specs, kw, shape = CASES['two_layers_shared_half']
    net = randomize(Net(specs, **kw)).eval()
    path = str(tmp_path / 'kw.onnx')
    torch.onnx.export(net, (torch.randn(shape),), path, **onnx_export_kwargs(), input_names=['x'],
                      dynamic_axes={'x': {0: 'batch'}})
    session = ort.InferenceSession(path)
    for batch in (1, 3):
        x = torch.randn(batch, *shape[1:])
        with torch.no_grad():
            ref = net(x)
        out = torch.from_numpy(session.run(None, {'x': x.numpy()})[0])
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
