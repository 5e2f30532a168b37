"""Official DWNet checkpoints -> dynconv_mm classifier keys: every key accounted for, file formats, CLI."""
import importlib.util
import os.path as osp
import types
from collections import OrderedDict

import pytest
import torch

from dynconv_mm.converters.common import ConversionError
from dynconv_mm.converters.dwnet import convert_dwnet, infer_num_stages, load_dwnet_checkpoint

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def _cli():
    spec = importlib.util.spec_from_file_location(
        'dwnet_to_mm', osp.join(ROOT, 'tools', 'model_converters', 'dwnet_to_mm.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _model_keys(dynamic: bool):
    from dynconv_mm.backbones.dwnet import DWNet
    backbone = DWNet(embed_dims=32, depths=[1, 1, 2, 1], dynamic=dynamic, drop_path_rate=0.)
    keys = {f'backbone.{k}': v for k, v in backbone.state_dict().items()}
    keys['head.fc.weight'] = torch.empty(10, 256)
    keys['head.fc.bias'] = torch.empty(10)
    return keys


@pytest.mark.parametrize('name, dynamic, n_keys', [
    ('dwnet_static_d32_1121.pt', False, 157), ('dwnet_dynamic_d32_1121.pt', True, 192)])
def test_golden_state_dict_fully_mapped(golden, name, dynamic, n_keys):
    src = golden(name)['state_dict']
    assert infer_num_stages(src) == 4
    out, report = convert_dwnet(src, model_keys=_model_keys(dynamic))
    report.check()
    assert report.ok and len(report.mapped) == len(src) == n_keys and not report.dropped
    assert report.mapped['norm.weight'] == 'backbone.norm3.weight'
    assert report.mapped['head.bias'] == 'head.fc.bias'
    assert report.mapped['patch_embed.proj.weight'] == 'backbone.patch_embed.proj.weight'
    assert report.mapped['layers.2.downsample.reduction.weight'] == 'backbone.layers.2.downsample.reduction.weight'
    if dynamic:
        k = 'layers.1.blocks.0.attn2conv.conv.conv2.weight'
        assert report.mapped[k] == 'backbone.' + k
    for k, v in src.items():   # values are passed through untouched
        assert out[report.mapped[k]] is v


def test_inhomogeneous_keys_map():
    from dynconv_mm.backbones.dwnet import DWNet
    backbone = DWNet(embed_dims=32, depths=[1, 1, 1, 1], inhomogeneous=True)
    src = OrderedDict(backbone.state_dict())
    src['norm.weight'], src['norm.bias'] = src.pop('norm3.weight'), src.pop('norm3.bias')
    src['head.weight'], src['head.bias'] = torch.zeros(5, 256), torch.zeros(5)
    assert any('attn2conv.conv.conv1.1.running_var' in k for k in src)
    out, report = convert_dwnet(src)
    report.check()
    assert set(out) == {f'backbone.{k}' for k in backbone.state_dict()} | {'head.fc.weight', 'head.fc.bias'}


def test_three_stage_model_final_norm():
    src = {'layers.2.blocks.0.attn2conv.conv0.weight': torch.ones(3, 1, 1, 1),
           'layers.2.blocks.0.bn.weight': torch.ones(3), 'norm.weight': torch.ones(3)}
    out, report = convert_dwnet(src)
    assert report.ok and 'backbone.norm2.weight' in out


def test_unknown_and_missing_keys_are_reported(golden):
    src = OrderedDict(golden('dwnet_static_d32_1121.pt')['state_dict'])
    src['absolute_pos_embed'] = torch.zeros(1, 256, 32)
    src['layers.0.blocks.0.attn.relative_position_bias_table'] = torch.zeros(169, 3)
    del src['layers.0.blocks.0.mlp.fc1.bias']
    out, report = convert_dwnet(src, model_keys=_model_keys(False))
    assert report.unplaced == ['absolute_pos_embed', 'layers.0.blocks.0.attn.relative_position_bias_table']
    assert report.missing == ['backbone.layers.0.blocks.0.mlp.fc1.bias']
    with pytest.raises(ConversionError, match='absolute_pos_embed'):
        report.check()


def test_wrong_architecture_shape_error(golden):
    src = golden('dwnet_static_d32_1121.pt')['state_dict']
    with pytest.raises(ConversionError, match='shape'):
        convert_dwnet(src, model_keys=_model_keys(True) | {
            'backbone.layers.0.blocks.0.attn2conv.conv.bias': torch.empty(64)})


def test_not_a_dwnet_state_dict():
    with pytest.raises(ConversionError, match='layers'):
        convert_dwnet({'conv1.weight': torch.zeros(1)})


def _swin_style(sd):
    return {'model': sd, 'optimizer': {'state': {}, 'param_groups': []}, 'lr_scheduler': {'last_epoch': 3},
            'max_accuracy': 81.2, 'epoch': 299}


def test_checkpoint_formats(tmp_path, golden):
    sd = golden('dwnet_dynamic_d32_1121.pt')['state_dict']
    # Swin-style dict of plain data: the safe loader accepts it
    torch.save(_swin_style(sd), tmp_path / 'plain.pth')
    loaded = load_dwnet_checkpoint(str(tmp_path / 'plain.pth'))
    assert list(loaded) == list(sd) and torch.equal(loaded['head.weight'], sd['head.weight'])
    # bare state dict, saved from a DataParallel model
    torch.save(OrderedDict((f'module.{k}', v) for k, v in sd.items()), tmp_path / 'bare.pth')
    assert list(load_dwnet_checkpoint(str(tmp_path / 'bare.pth'))) == list(sd)
    # with the training config object: refused unless trusted
    ckpt = _swin_style(sd)
    ckpt['config'] = types.SimpleNamespace(MODEL=types.SimpleNamespace(TYPE='ddwnet'))
    torch.save(ckpt, tmp_path / 'cfg.pth')
    with pytest.raises(ConversionError, match='trusted'):
        load_dwnet_checkpoint(str(tmp_path / 'cfg.pth'))
    assert list(load_dwnet_checkpoint(str(tmp_path / 'cfg.pth'), trusted=True)) == list(sd)


def test_cli(tmp_path, golden, capsys):
    cli = _cli()
    sd = golden('dwnet_dynamic_d32_1121.pt')['state_dict']
    ckpt = _swin_style(sd)
    ckpt['config'] = types.SimpleNamespace(TAG='default')
    torch.save(ckpt, tmp_path / 'src.pth')
    dst = tmp_path / 'out' / 'dst.pth'
    assert cli.main([str(tmp_path / 'src.pth'), str(dst)]) == 1      # untrusted file
    assert not dst.exists()
    assert cli.main([str(tmp_path / 'src.pth'), str(dst), '--trusted']) == 0
    assert '192 keys mapped' in capsys.readouterr().out
    saved = torch.load(dst, weights_only=True)
    expected, _ = convert_dwnet(sd)
    assert list(saved['state_dict']) == list(expected)
    assert torch.equal(saved['state_dict']['backbone.norm3.weight'], sd['norm.weight'])
    # an unaccounted key: non-zero exit, nothing written, the key is named
    bad = dict(sd, extra_token=torch.zeros(1))
    torch.save({'model': bad}, tmp_path / 'bad.pth')
    dst2 = tmp_path / 'bad_out.pth'
    assert cli.main([str(tmp_path / 'bad.pth'), str(dst2)]) == 1
    assert not dst2.exists() and 'extra_token' in capsys.readouterr().err


def test_dense_backbone_target(tmp_path, golden):
    """ImageNet weights for a dense backbone: body mapped, final LayerNorm and head dropped with reasons,
    BN output norms left to the downstream task; loads through init_cfg Pretrained(prefix='backbone.')."""
    from dynconv_mm.backbones.dwnet import DWNet
    src = golden('dwnet_dynamic_d32_1121.pt')['state_dict']
    dense = dict(embed_dims=32, depths=[1, 1, 2, 1], dynamic=True, mode='dense', out_indices=(0, 1, 2, 3))
    model_keys = {f'backbone.{k}': v for k, v in DWNet(**dense).state_dict().items()}
    out, report = convert_dwnet(src, model_keys=model_keys, target='dense_backbone')
    assert set(report.dropped) == {'norm.weight', 'norm.bias', 'head.weight', 'head.bias'}
    assert all(k.startswith('backbone.norm') for k in report.missing) and len(report.missing) == 4 * 5
    with pytest.raises(ConversionError, match='norm0'):
        report.check()
    report.check(allow_missing=[r'backbone\.norm\d+\..*'])
    assert len(out) == len(src) - 4

    cli = _cli()
    torch.save({'model': src}, tmp_path / 'src.pth')
    assert cli.main([str(tmp_path / 'src.pth'), str(tmp_path / 'dense.pth'), '--target', 'dense_backbone']) == 0
    model = DWNet(**dense, init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'dense.pth'),
                                         prefix='backbone.'))
    model.init_weights()
    sd = model.state_dict()
    for k, v in src.items():
        if not k.startswith(('norm.', 'head.')):
            assert torch.equal(sd[k], v), k
    assert torch.equal(sd['norm3.running_var'], torch.ones(256))   # untouched BatchNorm output norm
