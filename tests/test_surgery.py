"""``dynamize`` on networks people bring: torchvision ResNet-50 and MobileNetV2, timm ConvNeXt-T and
EfficientNet-Lite0 (random weights, trained-looking norms), with every registered layer type: the
report, exactness where the layer claims it, the state-dict round trip, a training step, ONNX export
with a dynamic batch; and the rules, TF-style padding, shared modules and folding back."""
import copy
import io
import os.path as osp

import pytest
import torch
from conftest import randomize_norms
from torch import nn

import dynconv_mm
from dynconv_mm import dynamize
from dynconv_mm.layers import LayerProtocol
from dynconv_mm.layers.torch_internals import onnx_export_kwargs
from dynconv_mm.registry import registered_names

timm = pytest.importorskip('timm', reason='timm is not installed (pip install timm)')
ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
torchvision = pytest.importorskip('torchvision', reason='torchvision is not installed')

TYPES = registered_names('conv')
#: layer options that make a type exactly the convolution it replaces (RepVGG's own ReLU is the method's)
EXACT_OPTIONS = {'RepVGGBlock': dict(act_cfg=None), 'RepVGGBlock_OREPA': dict(act_cfg=None)}
#: these networks keep all their blocks in one container, which the conv_cfg naming reads as one stage:
#: KernelWarehouse gets a warehouse per layer here (see test_kernel_warehouse_sharing_too_wide)
for _kw in ('KWConv1d', 'KWConv2d', 'KWConv3d', 'KWLinear'):
    EXACT_OPTIONS[_kw] = dict(sharing_range=())


def _trained_looking(model: nn.Module, seed: int = 0) -> nn.Module:
    return randomize_norms(model, seed, affine=True).eval()


NETWORKS = {
    'resnet50': lambda: torchvision.models.resnet50(),
    'mobilenet_v2': lambda: torchvision.models.mobilenet_v2(),
    'convnext_tiny': lambda: timm.create_model('convnext_tiny', pretrained=False),
    'efficientnet_lite0': lambda: timm.create_model('tf_efficientnet_lite0', pretrained=False),
}
_CACHE = {}


def network(name: str) -> nn.Module:
    if name not in _CACHE:
        torch.manual_seed(0)
        _CACHE[name] = _trained_looking(NETWORKS[name]())
    return copy.deepcopy(_CACHE[name])


X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _rule(name):
    return dict(type=name, options=EXACT_OPTIONS.get(name, {}))


@pytest.mark.parametrize('type_name', TYPES)
@pytest.mark.parametrize('net', list(NETWORKS))
def test_dynamize_network(net, type_name):
    model = network(net)
    with torch.no_grad():
        before = model(X)
    n_params = len(list(model.named_parameters(remove_duplicate=False)))
    model, report = dynamize(model, _rule(type_name), example_input=X)
    assert not report.lost and len(report.parameters) == n_params, report.lost
    if not report.changes:  # the type takes none of this network's convolutions: each says why
        assert report.skipped
        return
    layers = [model.get_submodule(c.paths[0]) for c in report.changes]
    assert all(type(m).__name__ == type_name for m in layers)
    for change in report.changes:
        assert change.max_rel_diff is not None
        if change.exact:
            assert change.max_rel_diff < 1e-5, (change.paths, change.note, change.max_rel_diff)
    if report.exact and not any(isinstance(m, dynconv_mm.layers.TemperatureMixin) and type_name.startswith('KW')
                                for m in model.modules()):
        assert report.model_max_rel_diff < 1e-4, report.model_max_rel_diff
        with torch.no_grad():
            torch.testing.assert_close(model(X), before, rtol=0, atol=1e-4 * before.abs().max().item())

    # the state dict round trip: the same conversion of another copy loads it and computes the same
    other, _ = dynamize(network(net), _rule(type_name), check=False, seed=1)
    other.load_state_dict(model.state_dict(), strict=True)
    other.eval()
    with torch.no_grad():
        torch.testing.assert_close(other(X), model(X))

    # a training step
    model.train()
    out = model(X)
    (out.square().mean() + dynconv_mm.engine.collect_aux_losses(model)).backward()
    grads = [p.grad for m in layers for p in m.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(g is None or torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize('type_name', TYPES)
def test_dynamized_onnx_export(type_name):
    """ONNX with a dynamic batch axis of MobileNetV2 (depth-wise, point-wise and k x k convolutions)
    dynamized with each type; onnxruntime matches PyTorch at batch 1 and 3."""
    ort = pytest.importorskip('onnxruntime', reason='onnxruntime is not installed')
    model, report = dynamize(network('mobilenet_v2'), _rule(type_name), check=False)
    if not report.changes:
        pytest.skip(f'{type_name} takes no convolution of MobileNetV2')
    model.eval()
    dynconv_mm.reparameterize_model(model)  # what is exported of re-parameterized layers: the deploy form
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(model, (X[:1],), buf, input_names=['x'], output_names=['y'], opset_version=17,
                          dynamic_axes={'x': {0: 'batch'}, 'y': {0: 'batch'}}, **onnx_export_kwargs())
    sess = ort.InferenceSession(buf.getvalue(), providers=['CPUExecutionProvider'])
    for b in (1, 3):
        x = torch.randn(b, 3, 64, 64)
        with torch.no_grad():
            ref = model(x)
        got = torch.from_numpy(sess.run(None, {'x': x.numpy()})[0])
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize('type_name', [t for t in TYPES if t in ('DOConv2d', 'OREPA', 'DBB', 'RepVGGBlock')])
def test_reparameterized_back_to_a_plain_model(type_name):
    """dynamize with a re-param type, then reparameterize_model: a plain model computing the same function."""
    model = network('resnet50')
    with torch.no_grad():
        before = model(X)
    model, report = dynamize(model, _rule(type_name))
    dynconv_mm.reparameterize_model(model.eval())
    assert all(getattr(m, 'deploy', True) for m in model.modules() if isinstance(m, LayerProtocol))
    with torch.no_grad():
        torch.testing.assert_close(model(X), before, rtol=0, atol=1e-4 * before.abs().max().item())


def test_rules_select_by_kind_path_and_exclude():
    model = network('mobilenet_v2')
    _, report = dynamize(model, [dict(type='DynamicDWConv2d', kind='depthwise', exclude='features.1.*'),
                                 dict(type='ODConv2d', kind='pointwise', include='features.1[0-7].*',
                                      options=dict(num_experts=2))], check=False)
    kinds = {c.new_type for c in report.changes}
    assert kinds == {'DynamicDWConv2d', 'ODConv2d'}
    assert not any(p.startswith('features.1.') for c in report.changes for p in c.paths)
    od = [c for c in report.changes if c.new_type == 'ODConv2d']
    assert od and all(p.startswith('features.1') for c in od for p in c.paths)
    assert all(model.get_submodule(c.paths[0]).num_experts == 2 for c in od)
    plain = [n for n, m in model.named_modules() if type(m) is nn.Conv2d and m.kernel_size == (3, 3)]
    assert plain  # the k x k convolutions no rule selected are kept


def test_rule_errors():
    model = nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.raises(ValueError, match="unknown layer type 'ODConv'"):
        dynamize(model, 'ODConv')
    with pytest.raises(ValueError, match="unknown kind"):
        dynamize(model, dict(type='ODConv2d', kind='3x3'))
    with pytest.raises(ValueError, match="unknown rule key"):
        dynamize(model, dict(type='ODConv2d', kinds='kxk'))
    with pytest.raises(ValueError, match="kw_attention must be 'prior' or 'keep'"):
        dynamize(model, 'KWConv2d', kw_attention='prio')


def test_padding_same_tf_same_dilation_groups_bias_1d_3d_and_shared_modules():
    shared = nn.Conv2d(8, 8, 3, padding=1, bias=True)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.same = nn.Conv2d(3, 8, 4, padding='same', dilation=1)   # even kernel: uneven padding
            self.tf = timm.layers.Conv2dSame(8, 8, 3, stride=2)          # TF "same" from the input size
            self.dil = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2, bias=True)
            self.a, self.b = shared, shared
            self.c1 = nn.Conv1d(8, 8, 3, padding=1)
            self.c3 = nn.Conv3d(8, 8, 3, padding=1)

        def forward(self, x):
            x = self.b(self.a(self.dil(self.tf(self.same(x)))))
            y = self.c1(x.flatten(2))
            z = self.c3(x.unsqueeze(2).expand(-1, -1, 3, -1, -1))
            return x.mean() + y.mean() + z.mean()

    for type_name, convs in (('DyConv2d', 4), ('KWConv1d', 1), ('KWConv3d', 1), ('DOConv2d', 4)):
        torch.manual_seed(0)
        net = Net().eval()
        x = torch.randn(2, 3, 15, 17)
        with torch.no_grad():
            before = net(x)
        _, report = dynamize(net, type_name, example_input=x)
        assert len(report.changes) == convs, report.summary()
        assert all(c.max_rel_diff < 1e-5 for c in report.changes if c.exact), report.summary()
        if type_name in ('DyConv2d', 'DOConv2d'):
            shared_change = [c for c in report.changes if len(c.paths) == 2]
            assert shared_change and net.a is net.b  # one new layer at both paths
            assert abs(float(net(x)) - float(before)) < 1e-4 * abs(float(before)) + 1e-6


def test_kernel_warehouse_sharing_too_wide():
    """torchvision's MobileNetV2 keeps every block in ``features``: one stage by the conv_cfg naming, so the
    default sharing would give all its 1x1 convolutions one warehouse of 8x8 cells and attentions too
    large for memory. That is refused, saying what to do, before anything is allocated."""
    model = network('mobilenet_v2')
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"sharing_range=\('conv',\)"):
        dynamize(model, 'KWConv2d', check=False)
    after = model.state_dict()  # refused: the model is as it was
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_dynamize_twice_leaves_the_dynamic_layers_alone():
    model = network('mobilenet_v2')
    _, first = dynamize(model, dict(type='ODConv2d', kind='kxk'), check=False)
    _, second = dynamize(model, 'CondConv2d', check=False)
    inside = [p for c in second.changes for p in c.paths if '.attention.' in p]
    assert first.changes and not inside


# ------------------------------------------------------------------------------------------------
# docs/dynamize.md: the table of every layer type at conversion is what the layers report
_PROBES = (('3x3', dict(kernel_size=3, padding=1)), ('depth-wise 3x3', dict(kernel_size=3, padding=1, groups=8)),
           ('1x1', dict(kernel_size=1)), ('5x5', dict(kernel_size=5, padding=2)))


def layer_table_markdown() -> str:
    """The Markdown table of every registered conv type: what it takes of the probe convolutions, exact or
    not, and the layer's own note (or the reason it keeps a convolution)."""
    lines = ['| type | converts (exact?) | keeps, and why | the layer says |', '|---|---|---|---|']
    for name in registered_names('conv'):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Conv2d(8, 8, bias=False, **kw) for _, kw in _PROBES])
        _, report = dynamize(model, name, example_input=torch.randn(2, 8, 8, 8))
        label = {str(i): probe for i, (probe, _) in enumerate(_PROBES)}
        took = ', '.join(f"{label[c.paths[0]]} ({'exact' if c.exact else 'not exact'})" for c in report.changes)
        reasons = {}
        for path, why in report.skipped.items():
            reasons.setdefault(why.replace(name + ' ', '', 1), []).append(label[path])
        kept = '; '.join(f"{', '.join(p)}: {why}" for why, p in reasons.items())
        notes = ' / '.join(dict.fromkeys(c.note for c in report.changes))
        lines.append(f'| `{name}` | {took or "-"} | {kept or "-"} | {notes or "-"} |')
    return '\n'.join(lines)


def test_docs_layer_table_is_what_the_layers_report():
    text = open(osp.join(ROOT, 'docs', 'dynamize.md')).read()
    start, end = '<!-- layer-table:start -->\n', '<!-- layer-table:end -->'
    table = text[text.index(start) + len(start):text.index(end)].strip()
    assert table == layer_table_markdown(), 'docs/dynamize.md: regenerate the table with layer_table_markdown()'
