"""Registration in mmcv's conv registry and in the task libraries' MODELS registries, through the
configs users write (``custom_imports`` + ``conv_cfg``)."""
import importlib.util
import os.path as osp
import subprocess
import sys

import pytest
import torch

import dynconv_mm
from dynconv_mm.registry import available_scopes, registered_names

CONFIGS = osp.join(osp.dirname(__file__), 'data', 'configs')


def _need(mod):
    if importlib.util.find_spec(mod) is None:
        pytest.skip(f'{mod} is not installed')


def test_every_conv_type_is_in_mmcv_conv_registry():
    from mmcv.cnn import build_conv_layer
    from mmengine.registry import MODELS

    names = registered_names('conv')
    assert {'DOConv2d', 'KWConv2d', 'PEDConv2d', 'ODConv2d', 'CondConv2d', 'DyConv2d',
            'DynamicDWConv2d', 'OREPA'} <= set(names)
    for name in names:
        assert MODELS.get(name) is not None, name
    layer = build_conv_layer(dict(type='DOConv2d'), 4, 8, 3, padding=1)
    assert type(layer).__name__ == 'DOConv2d'
    assert layer(torch.randn(2, 4, 9, 9)).shape == (2, 8, 9, 9)


@pytest.mark.parametrize('scope', ['mmpretrain', 'mmdet', 'mmseg'])
def test_backbones_in_every_task_registry(scope):
    _need(scope)
    reg = importlib.import_module(f'{scope}.registry').MODELS
    names = registered_names('model')
    assert {'KWResNet', 'DWNet'} <= set(names)
    for name in names:
        assert reg.get(name) is not None, f'{name} missing from {scope}'
    assert scope in available_scopes()


def test_hooks_registered():
    from mmengine.registry import HOOKS
    assert HOOKS.get('TemperatureHook') is dynconv_mm.engine.TemperatureHook


def _build(cfg_name, scope):
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    cfg = Config.fromfile(osp.join(CONFIGS, cfg_name))
    init_default_scope(scope)
    reg = importlib.import_module(f'{scope}.registry').MODELS
    return reg.build(cfg.model)


def _plugin_convs(model):
    return [n for n, m in model.named_modules() if type(m).__name__ == 'DOConv2d']


def test_mmpretrain_config_with_plugin_conv():
    _need('mmpretrain')
    model = _build('mmpretrain_resnet_plugin_conv.py', 'mmpretrain')
    assert len(_plugin_convs(model.backbone)) == 20   # ResNet-18: stem + 16 block convs + 3 downsample
    model.train()
    out = model(torch.randn(2, 3, 32, 32), mode='tensor')
    out.sum().backward()


def test_mmdet_config_with_plugin_conv():
    _need('mmdet')
    model = _build('mmdet_maskrcnn_plugin_conv.py', 'mmdet')
    assert len(_plugin_convs(model.backbone)) == 53
    model.eval()
    with torch.no_grad():
        feats = model.extract_feat(torch.randn(1, 3, 64, 64))
    assert len(feats) == 5


def test_mmseg_config_with_plugin_conv():
    _need('mmseg')
    model = _build('mmseg_upernet_plugin_conv.py', 'mmseg')
    assert _plugin_convs(model.backbone)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64), mode='tensor')
    assert out.shape[:2] == (1, 4)


def test_import_is_light_and_works_without_task_libraries(tmp_path):
    """dynconv_mm imports when none of mmdet/mmseg/mmpretrain can be imported."""
    blocker = tmp_path / 'block.py'
    blocker.write_text(
        'import sys\n'
        'class _Block:\n'
        '    def find_spec(self, name, path=None, target=None):\n'
        "        if name.split('.')[0] in ('mmdet', 'mmseg', 'mmpretrain'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        'sys.meta_path.insert(0, _Block())\n')
    code = ('import runpy; runpy.run_path(%r)\n'
            'import dynconv_mm\n'
            'from dynconv_mm.registry import available_scopes, register_all_scopes\n'
            "from mmcv.cnn import build_conv_layer\n"
            "print(type(build_conv_layer(dict(type='KWConv2d'), 4, 4, 3)).__name__)\n") % str(blocker)
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert 'KWConv2d' in out.stdout
