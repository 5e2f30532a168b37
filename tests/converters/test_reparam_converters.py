"""DO-Conv and OREPA checkpoint converters: every key accounted for, NaN in unused tensors tolerated, CLIs."""
import importlib.util
import os.path as osp

import pytest
import torch
from torch import nn

from dynconv_mm.converters.common import ConversionError, compare_with, load_checkpoint_file
from dynconv_mm.converters.doconv import convert_doconv
from dynconv_mm.converters.orepa import convert_orepa_block, convert_orepa_resnet, is_deploy_state_dict
from dynconv_mm.layers.reparam import OREPA, DOConv2d, RepVGGBlock_OREPA

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, osp.join(ROOT, 'tools', 'model_converters', f'{name}.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _official_doconv_state(layer: DOConv2d):
    """The state dict the official layer would save (with its ``d_diag`` Parameter)."""
    sd = dict(layer.state_dict())
    sd['d_diag'] = layer.d_diag.clone()
    return sd


class _Net(nn.Module):
    def __init__(self, deploy=False):
        super().__init__()
        self.conv = DOConv2d(4, 8, 3, padding=1, deploy=deploy)
        self.bn = nn.BatchNorm2d(8)
        self.head = DOConv2d(8, 2, 1, deploy=deploy)


def test_doconv_converter_checks_and_drops_d_diag():
    net = _Net()
    with torch.no_grad():
        net.conv.D.normal_()
    sd = {f'conv.{k}': v for k, v in _official_doconv_state(net.conv).items()}
    sd.update({f'bn.{k}': v for k, v in net.bn.state_dict().items()})
    sd.update({f'head.{k}': v for k, v in net.head.state_dict().items()})
    out, report = convert_doconv(sd)
    compare_with(report, out, net.state_dict()).check()
    assert list(report.dropped) == ['conv.d_diag']
    assert torch.equal(out['conv.D'], net.conv.D)
    # a d_diag that is not the DO-Conv constant is rejected, naming the key
    bad = dict(sd)
    bad['conv.d_diag'] = bad['conv.d_diag'] * 2
    with pytest.raises(ConversionError, match='conv.d_diag'):
        convert_doconv(bad)


def test_doconv_converter_maps_fused_plain_convs():
    net = _Net()
    fused = {'conv.weight': net.conv.kernel().detach(), 'conv.bias': net.conv.bias.detach(),
             'head.weight': net.head.kernel().detach(), 'head.bias': net.head.bias.detach()}
    fused.update({f'bn.{k}': v for k, v in net.bn.state_dict().items()})
    target = _Net(deploy=True)
    out, report = convert_doconv(fused, expected=target.state_dict())
    compare_with(report, out, target.state_dict()).check()
    target.load_state_dict(out)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(target.conv(x), net.conv(x))


def _to_official_repvgg_orepa(block: RepVGGBlock_OREPA, nan_row: bool):
    """Rename our RepVGGBlock_OREPA keys to the official ones (and add the official unused vector row)."""
    sd = {}
    for k, v in block.state_dict().items():
        if k.startswith('rbr_dense.weight_orepa_'):
            k = k.replace('weight_orepa_', 'weight_rbr_')
        if k == 'rbr_dense.vector' and nan_row:
            v = torch.cat([v, torch.full((1, v.shape[1]), float('nan'))])
        sd[k] = v
    sd['rbr_dense.weight_rbr_prior'] = block.rbr_dense.weight_orepa_prior
    sd['rbr_dense.weight_rbr_avg_avg'] = torch.full((3, 3), 1 / 9)
    sd['rbr_dense.id_tensor'] = block.rbr_dense.id_tensor
    return sd


def test_orepa_converter_tolerates_nan_in_unused_tensors():
    block = RepVGGBlock_OREPA(6, 6, 3).eval()
    official = _to_official_repvgg_orepa(block, nan_row=True)
    assert official['rbr_dense.vector'].shape == (6, 6) and torch.isnan(official['rbr_dense.vector'][5]).all()
    out, report = convert_orepa_block(official)
    fresh = RepVGGBlock_OREPA(6, 6, 3).eval()
    compare_with(report, out, fresh.state_dict()).check()
    fresh.load_state_dict(out)
    x = torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        y = fresh(x)
        torch.testing.assert_close(y, block(x))
        fresh.switch_to_deploy()
        assert torch.isfinite(fresh(x)).all()
    # OREPA 5x5: the official prior beyond 3x3 is uninitialised memory; it is dropped, not loaded
    layer = OREPA(4, 4, 5, norm_cfg=dict(type='BN'))
    sd = dict(layer.state_dict())
    sd['weight_orepa_prior'] = torch.full((4, 5, 5), float('nan'))
    out, report = convert_orepa_block(sd)
    assert 'weight_orepa_prior' in report.dropped
    layer.load_state_dict(out)
    assert torch.isfinite(layer(torch.randn(2, 4, 6, 6))).all()


def test_orepa_resnet_converter_reports_unknown_keys(golden):
    g = golden('orepa_resnet18_w025.pt')
    sd = dict(g['state_dict'])
    assert not is_deploy_state_dict(sd) and is_deploy_state_dict(g['deploy_state_dict'])
    sd['extra.weight'] = torch.zeros(1)
    _, report = convert_orepa_resnet(sd)
    assert report.unplaced == ['extra.weight']
    with pytest.raises(ConversionError, match='extra.weight'):
        report.check()
    # a deployed checkpoint names the stem, 3x3 and shortcut convs differently; all map to ``reparam``
    out, report = convert_orepa_resnet(g['deploy_state_dict'])
    assert report.ok and all(k.endswith(('reparam.weight', 'reparam.bias')) for k in out if k.startswith('backbone'))


def test_orepa_cli_round_trip(golden, tmp_path):
    g = golden('orepa_resnet18_w025.pt')
    from dynconv_mm.backbones.orepa_resnet import OREPAResNet
    tool = _tool('orepa_to_mm')
    for key, deploy in (('state_dict', False), ('deploy_state_dict', True)):
        src, dst = tmp_path / f'{key}.pth', tmp_path / f'{key}_mm.pth'
        torch.save({'state_dict': {f'module.{k}': v for k, v in g[key].items()}}, src)
        assert tool.main([str(src), str(dst), '--width', '0.25']) == 0
        sd = load_checkpoint_file(str(dst))['state_dict']
        model = OREPAResNet(18, 0.25, deploy=deploy)
        model.load_state_dict({k[len('backbone.'):]: v for k, v in sd.items() if k.startswith('backbone.')})
    # wrong architecture: shape mismatch is an error and nothing is written
    assert tool.main([str(tmp_path / 'state_dict.pth'), str(tmp_path / 'bad.pth'), '--width', '0.5']) == 1
    assert not (tmp_path / 'bad.pth').exists()


def test_doconv_cli(tmp_path):
    layer = DOConv2d(4, 8, 3, padding=1)
    src, dst = tmp_path / 'do.pth', tmp_path / 'do_mm.pth'
    torch.save(_official_doconv_state(layer), src)
    assert _tool('doconv_to_mm').main([str(src), str(dst)]) == 0
    fresh = DOConv2d(4, 8, 3, padding=1)
    fresh.load_state_dict(load_checkpoint_file(str(dst))['state_dict'])
    assert torch.equal(fresh.W, layer.W)
