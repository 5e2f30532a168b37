"""Every KW / DWNet backbone (and PEDResNet, deployed OREPAResNet) exports to ONNX with a dynamic batch
axis, and onnxruntime reproduces PyTorch at batch sizes 1, 2 and 5.

``batched_conv`` switches to its export-friendly path while exporting; these tests catch any other
code that bakes the export batch size into the graph (a reshape with a Python int batch). The exports
print no ``TracerWarning`` from dynconv_mm except the ones :data:`TRACER_WARNINGS` lists, each a Python
``if`` on a spatial size that the export fixes (documented in docs/static_to_dynamic.md).
"""
import copy
import os.path as osp
import warnings

import pytest
import torch
from conftest import randomize_norms
from torch import nn

import dynconv_mm  # noqa: F401
from dynconv_mm.layers.torch_internals import onnx_export_kwargs

ort = pytest.importorskip('onnxruntime')
pytest.importorskip('onnx')

PACKAGE = osp.dirname(osp.abspath(dynconv_mm.__file__))
#: backbone name prefix -> the dynconv_mm files whose TracerWarnings its export prints: DWNet pads odd sizes
#: in PatchEmbed / PatchMerging; the inhomogeneous kernel checks that its kernel map fits the input
TRACER_WARNINGS = {'DWNet': {osp.join('backbones', 'dwnet.py')},
                   'DWNet-inhomogeneous': {osp.join('backbones', 'dwnet.py'), osp.join('layers', 'dynamic_dw.py')}}

BACKBONES = {
    'KWResNet18': (dict(type='KWResNet', depth=18, stage_blocks=[1, 1, 1, 1], out_indices=(0, 1, 2, 3)), 32),
    'KWResNet50': (dict(type='KWResNet', depth=50, stage_blocks=[1, 1, 1, 1], out_indices=(0, 1, 2, 3)), 32),
    'KWMobileNetV2': (dict(type='KWMobileNetV2', widen_factor=0.5), 32),
    'KWConvNeXt': (dict(type='KWConvNeXt', arch=dict(depths=[1, 1, 2, 1], channels=[32, 64, 128, 256])), 32),
    'DWNet-static': (dict(type='DWNet', embed_dims=8, depths=[1, 1, 1, 1], out_indices=(0, 1, 2, 3)), 64),
    'DWNet-dynamic': (dict(type='DWNet', embed_dims=8, depths=[1, 1, 1, 1], dynamic=True,
                           out_indices=(0, 1, 2, 3)), 64),
    'DWNet-inhomogeneous': (dict(type='DWNet', embed_dims=8, depths=[1, 1, 1, 1], inhomogeneous=True), 64),
    'PEDResNet18': (dict(type='PEDResNet', depth=18, widen_factor=0.25, out_indices=(0, 1, 2, 3)), 32),
    'OREPAResNet18-deployed': (dict(type='OREPAResNet', depth=18, width_multiplier=0.25, out_indices=(0, 1, 2, 3)),
                               32),
}


def _build(cfg):
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    init_default_scope('mmpretrain')
    return MODELS.build(copy.deepcopy(cfg))


class _Flat(nn.Module):
    """The backbone with its outputs as a flat tuple (ONNX outputs)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        out = self.backbone(x)
        return tuple(out) if isinstance(out, (list, tuple)) else (out,)


@pytest.mark.parametrize('name', sorted(BACKBONES))
def test_backbone_onnx_dynamic_batch(name, tmp_path):
    cfg, size = BACKBONES[name]
    backbone = randomize_norms(_build(cfg))
    if name.endswith('deployed'):
        dynconv_mm.reparameterize_model(backbone)
    model = _Flat(backbone).eval()
    # KW attentions read the temperature: export at an intermediate one so both terms are in the graph
    dynconv_mm.set_temperature(model, 0.3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        n_out = len(model(torch.randn(2, 3, size, size, generator=g)))
    path = str(tmp_path / f'{name}.onnx')
    names = [f'y{i}' for i in range(n_out)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.onnx.export(model, (torch.randn(2, 3, size, size, generator=g),), path, input_names=['x'],
                          output_names=names, dynamic_axes={'x': {0: 'batch'}, **{n: {0: 'batch'} for n in names}},
                          opset_version=17, **onnx_export_kwargs())
    ours = {(osp.relpath(w.filename, PACKAGE), w.lineno) for w in caught
            if issubclass(w.category, torch.jit.TracerWarning) and w.filename.startswith(PACKAGE)}
    expected = set().union(*(files for prefix, files in TRACER_WARNINGS.items() if name.startswith(prefix)))
    ours = {(f, n) for f, n in ours if f not in expected}
    assert not ours, f'TracerWarnings from dynconv_mm (file, line): {sorted(ours)}'
    sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    for batch in (1, 2, 5):
        x = torch.randn(batch, 3, size, size, generator=g)
        with torch.no_grad():
            ref = model(x)
        got = sess.run(None, {'x': x.numpy()})
        assert len(got) == len(ref)
        for r, o in zip(ref, got):
            o = torch.from_numpy(o)
            assert o.shape == r.shape
            torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4 * r.abs().max().item())
