"""Every converter refuses what it does not convert: a plain network, another method's checkpoint, a deploy
checkpoint, an already converted one, or no network at all. The command-line tools exit with status 2, say
what the file looks like and which tool fits, and leave no output file. Converted checkpoints carry the class
names of their dataset (``meta.dataset_meta``) when the heads fit them.

Inputs: the reference fixtures made with the official code (``../shared/golden``), a torchvision ResNet-18
with random weights, and files made from them (a dynconv_mm classifier, a deployed dynconv_mm model, an
official-layout detector).
"""
from __future__ import annotations

import importlib.util
import os.path as osp
from collections import OrderedDict

import pytest
import torch
from conftest import load_golden

from dynconv_mm.converters.common import (
    WrongInputError,
    dataset_meta,
    describe_state_dict,
    load_checkpoint_file,
)

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOOLS = osp.join(ROOT, 'tools', 'model_converters')
STATIC_CONFIG = osp.join(ROOT, 'tests', 'data', 'configs', 'mmpretrain_tiny_folder.py')


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, osp.join(TOOLS, f'{name}.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _torchvision_resnet18():
    tv = pytest.importorskip('torchvision', reason='torchvision is not installed')
    return tv.models.resnet18(weights=None).state_dict()


def _golden_sd(name, key='state_dict'):
    return OrderedDict(load_golden(name)[key])


def _first_case(name, key='state_dict'):
    cases = load_golden(name)['cases']
    cases = list(cases.values()) if isinstance(cases, dict) else cases
    return OrderedDict(cases[0][key])


def _converted_kw():
    """What kernelwarehouse_to_mm.py makes of the official KW-ResNet-18: an mmpretrain classifier."""
    from dynconv_mm.converters.kernelwarehouse import convert_kernelwarehouse
    return convert_kernelwarehouse(_golden_sd('kw_resnet18_kw1d4x.pt'))[0]


def _dynconv_mm_deploy():
    """A deployed dynconv_mm classifier (what tools/reparameterize.py writes for an OREPA ResNet)."""
    from dynconv_mm.backbones.orepa_resnet import OREPAResNet
    sd = OrderedDict((f'backbone.{k}', v) for k, v in OREPAResNet(18, 0.25, deploy=True).state_dict().items())
    sd['head.fc.weight'], sd['head.fc.bias'] = torch.zeros(10, 128), torch.zeros(10)
    return sd


def _official_detector(backbone: dict, classes: int = 80):
    """An mmdet 2.x Mask R-CNN state dict with ``backbone`` (official keys) and FPN / RPN / RoI heads."""
    sd = OrderedDict((f'backbone.{k}', v) for k, v in backbone.items())
    sd['neck.lateral_convs.0.conv.weight'] = torch.zeros(8, 512, 1, 1)
    sd['rpn_head.rpn_conv.weight'] = torch.zeros(8, 8, 3, 3)
    sd['roi_head.bbox_head.fc_cls.weight'] = torch.zeros(classes + 1, 16)
    sd['roi_head.mask_head.conv_logits.weight'] = torch.zeros(classes, 8, 1, 1)
    return sd


def _official_segmentor(backbone: dict, classes: int = 150):
    sd = OrderedDict((f'backbone.{k}', v) for k, v in backbone.items())
    sd['decode_head.conv_seg.weight'] = torch.zeros(classes, 8, 1, 1)
    sd['decode_head.conv_seg.bias'] = torch.zeros(classes)
    return sd


# input -> (state dict factory, what the message says it looks like, the tool or remedy it names)
INPUTS = {
    'torchvision-resnet18': (_torchvision_resnet18, 'a plain (static) ResNet (torchvision / timm keys)',
                             'static_to_dynamic.py'),
    'kernelwarehouse': (lambda: _golden_sd('kw_resnet18_kw1d4x.pt'),
                        'an official KernelWarehouse classification checkpoint', 'kernelwarehouse_to_mm.py'),
    'dwnet': (lambda: _golden_sd('dwnet_dynamic_d32_1121.pt'),
              'a DWNet classification checkpoint (dynamic depth-wise kernels)', 'dwnet_to_mm.py'),
    'pedconv': (lambda: _golden_sd('pedconv_resnet18_w025.pt'), 'a PEDConv classification checkpoint',
                'pedconv_to_mm.py'),
    'orepa': (lambda: _golden_sd('orepa_resnet18_w025.pt'),
              'an official OREPA / DBB / RepVGG classification checkpoint', 'orepa_to_mm.py'),
    'orepa-deploy': (lambda: _golden_sd('orepa_resnet18_w025.pt', 'deploy_state_dict'),
                     'an official deployed OREPA / DBB / RepVGG classification checkpoint', 'orepa_to_mm.py'),
    'doconv': (lambda: _first_case('doconv_layers.pt'), 'an official DO-Conv model', 'doconv_to_mm.py'),
    'odconv': (lambda: _first_case('odconv_layers.pt'), 'an ODConv model', 'convert_odconv_layer'),
    'converted-kernelwarehouse': (_converted_kw, 'a dynconv_mm KernelWarehouse classifier', 'load it directly'),
    'dynconv_mm-deploy': (_dynconv_mm_deploy, 'a deployed dynconv_mm classifier', 'tools/reparameterize.py'),
    'kernelwarehouse-detector': (lambda: _official_detector(_golden_sd('kw_resnet18_kw1d4x.pt')),
                                 'a KernelWarehouse detector', 'downstream_to_mm.py'),
    'not-a-network': (lambda: OrderedDict(step=torch.tensor(3), lr=torch.tensor(0.1)),
                      'not a network state dict dynconv_mm recognises', 'is it a model checkpoint'),
}

# converter -> (arguments after SRC DST, what it says it expects, the inputs it converts)
CONVERTERS = {
    'kernelwarehouse_to_mm': ([], 'an official KernelWarehouse classification checkpoint', {'kernelwarehouse'}),
    'dwnet_to_mm': ([], 'an official DWNet classification checkpoint', {'dwnet'}),
    'pedconv_to_mm': ([], 'an official PEDConv ResNet checkpoint', {'pedconv'}),
    'orepa_to_mm': ([], 'an official OREPA / DBB / RepVGG ResNet checkpoint', {'orepa', 'orepa-deploy'}),
    'orepa_to_mm --layout blocks': (['--layout', 'blocks'], 'official OREPA / DBB / RepVGG blocks',
                                    {'orepa', 'orepa-deploy'}),
    'doconv_to_mm': ([], 'official DO-Conv layers', {'doconv'}),
    'downstream_to_mm': ([], 'an official KernelWarehouse / DWNet detector', {'kernelwarehouse-detector'}),
    'static_to_dynamic': ([], 'a static checkpoint', {'torchvision-resnet18'}),
}

CASES = [(c, i) for c, (_, _, ok) in CONVERTERS.items() for i in INPUTS if i not in ok]


@pytest.fixture(scope='module')
def input_files(tmp_path_factory):
    """Each input saved once, as a bare state dict file; a factory whose fixture is absent skips."""
    folder = tmp_path_factory.mktemp('inputs')
    made = {}

    def get(name):
        if name not in made:
            path = folder / f'{name}.pth'
            torch.save(INPUTS[name][0](), path)
            made[name] = path
        return made[name]
    return get


def _run(converter: str, src, dst):
    extra, _, _ = CONVERTERS[converter]
    name = converter.split()[0]
    argv = [str(src), STATIC_CONFIG, str(dst)] if name == 'static_to_dynamic' else [str(src), str(dst)]
    return _tool(name).main(argv + extra)


@pytest.mark.parametrize('converter,name', CASES, ids=[f'{c}<-{i}' for c, i in CASES])
def test_wrong_input_is_refused(converter, name, input_files, tmp_path, capsys):
    src, dst = input_files(name), tmp_path / 'out' / 'converted.pth'
    assert _run(converter, src, dst) == 2
    err = capsys.readouterr().err
    _, looks_like, remedy = INPUTS[name]
    _, expected, _ = CONVERTERS[converter]
    assert err.startswith(f'error: {src}: {expected}'), err
    assert f'was expected; this looks like {looks_like}' in err, err
    assert remedy in err, err
    assert not dst.exists() and not dst.parent.exists()


def test_refusal_leaves_an_existing_output_alone(input_files, tmp_path):
    dst = tmp_path / 'kept.pth'
    dst.write_bytes(b'an earlier result')
    assert _run('kernelwarehouse_to_mm', input_files('torchvision-resnet18'), dst) == 2
    assert dst.read_bytes() == b'an earlier result'
    assert [p.name for p in tmp_path.iterdir()] == ['kept.pth']   # no temporary file left behind


def test_the_issue_case_names_the_plain_resnet_and_both_remedies(input_files, tmp_path, capsys):
    """A torchvision ResNet-18 given to the KW converter: refused, with static_to_dynamic.py and --baseline."""
    assert _run('kernelwarehouse_to_mm', input_files('torchvision-resnet18'), tmp_path / 'x.pth') == 2
    err = capsys.readouterr().err
    assert 'no dynamic or re-parameterized layer' in err
    assert 'static_to_dynamic.py SRC CONFIG DST' in err and '--baseline' in err


def test_kernelwarehouse_baseline_option(input_files, tmp_path, capsys):
    """--baseline converts the official plain baselines and refuses a KernelWarehouse model."""
    dst = tmp_path / 'resnet18.pth'
    assert _tool('kernelwarehouse_to_mm').main([str(input_files('torchvision-resnet18')), str(dst), '--baseline']) == 0
    out = load_checkpoint_file(str(dst))
    assert 'backbone.layer4.1.conv2.weight' in out['state_dict'] and 'head.fc.weight' in out['state_dict']
    assert out['meta']['dataset_meta']['classes'] == dataset_meta('imagenet')['classes']
    capsys.readouterr()
    bad = tmp_path / 'bad.pth'
    assert _tool('kernelwarehouse_to_mm').main([str(input_files('kernelwarehouse')), str(bad), '--baseline']) == 2
    assert 'a plain baseline of the official KernelWarehouse repository' in capsys.readouterr().err
    assert not bad.exists()


def test_library_functions_refuse_too():
    from dynconv_mm.converters.doconv import convert_doconv
    from dynconv_mm.converters.dwnet import convert_dwnet
    from dynconv_mm.converters.kernelwarehouse import convert_kernelwarehouse
    from dynconv_mm.converters.orepa import convert_orepa_block, convert_orepa_resnet
    from dynconv_mm.converters.pedconv import convert_odconv_layer, convert_pedconv_layer, convert_pedconv_resnet
    from dynconv_mm.converters.static import convert_static_to_dynamic
    plain = _torchvision_resnet18()
    for fn in (convert_kernelwarehouse, convert_dwnet, convert_pedconv_resnet, convert_orepa_resnet,
               convert_orepa_block, convert_doconv, convert_pedconv_layer, convert_odconv_layer):
        with pytest.raises(WrongInputError, match='this looks like a plain'):
            fn(plain)
    with pytest.raises(WrongInputError, match='official KernelWarehouse classification checkpoint'):
        convert_static_to_dynamic(_golden_sd('kw_resnet18_kw1d4x.pt'), torch.nn.Module())


def test_recogniser_on_the_official_fixtures():
    kinds = {name: describe_state_dict(INPUTS[name][0]()) for name in
             ('kernelwarehouse', 'dwnet', 'pedconv', 'orepa', 'orepa-deploy', 'doconv', 'odconv')}
    assert {n: k.method for n, k in kinds.items()} == {
        'kernelwarehouse': 'kernelwarehouse', 'dwnet': 'dwnet', 'pedconv': 'pedconv', 'orepa': 'orepa',
        'orepa-deploy': 'orepa', 'doconv': 'doconv', 'odconv': 'odconv'}
    assert kinds['orepa-deploy'].deploy and not kinds['orepa'].deploy
    assert '4 warehouses, 19 attentions' in kinds['kernelwarehouse'].description
    mbv2 = describe_state_dict(_golden_sd('kw_mobilenetv2_050_kw1x.pt'))
    convnext = describe_state_dict(_golden_sd('kw_convnext_1121_d32_kw1x.pt'))
    assert (mbv2.arch, convnext.arch) == ('mobilenetv2', 'convnext')
    static = describe_state_dict(_golden_sd('dwnet_static_d32_1121.pt'))
    assert static.method == 'dwnet' and 'static depth-wise kernels' in static.description


# ------------------------------------------------------------------------------------------------
# dataset_meta
def _converted_meta(tool, sd, tmp_path, *extra):
    src, dst = tmp_path / 'src.pth', tmp_path / 'dst.pth'
    torch.save(sd, src)
    assert _tool(tool).main([str(src), str(dst), *extra]) == 0
    return load_checkpoint_file(str(dst))['meta']


def test_classification_converters_store_imagenet_classes(tmp_path):
    ImageNet = pytest.importorskip('mmpretrain.datasets', reason='mmpretrain.datasets does not import').ImageNet
    classes = list(ImageNet.METAINFO['classes'])
    assert len(classes) == 1000
    for tool, name in (('kernelwarehouse_to_mm', 'kernelwarehouse'), ('pedconv_to_mm', 'pedconv')):
        meta = _converted_meta(tool, INPUTS[name][0](), tmp_path)
        assert meta['dataset_meta']['classes'] == classes, tool


def test_no_class_names_for_heads_that_do_not_fit(tmp_path, capsys):
    """The OREPA and DWNet fixtures have 10-class heads: ImageNet's 1000 names would mislabel them."""
    pytest.importorskip('mmpretrain.datasets', reason='mmpretrain.datasets does not import')
    for tool, name, extra in (('orepa_to_mm', 'orepa', ['--width', '0.25']), ('dwnet_to_mm', 'dwnet', [])):
        meta = _converted_meta(tool, INPUTS[name][0](), tmp_path, *extra)
        assert 'dataset_meta' not in meta, tool
        assert 'has 10 outputs, not the 1000 of imagenet' in capsys.readouterr().out
    meta = _converted_meta('dwnet_to_mm', INPUTS['dwnet'][0](), tmp_path, '--target', 'dense_backbone')
    assert 'dataset_meta' not in meta   # backbone weights alone


def test_downstream_converter_stores_coco_and_ade20k_classes(tmp_path):
    CocoDataset = pytest.importorskip('mmdet.datasets', reason='mmdet.datasets does not import').CocoDataset
    ADE20KDataset = pytest.importorskip('mmseg.datasets', reason='mmseg.datasets does not import').ADE20KDataset
    kw = _golden_sd('kw_resnet18_kw1d4x.pt')
    kw = OrderedDict((k, v) for k, v in kw.items() if not k.startswith('fc.'))
    meta = _converted_meta('downstream_to_mm', _official_detector(kw), tmp_path)
    assert meta['dataset_meta']['classes'] == list(CocoDataset.METAINFO['classes'])
    assert len(meta['dataset_meta']['palette']) == 80
    meta = _converted_meta('downstream_to_mm', _official_segmentor(kw), tmp_path)
    assert meta['dataset_meta']['classes'] == list(ADE20KDataset.METAINFO['classes'])
    meta = _converted_meta('downstream_to_mm', _official_detector(kw, classes=3), tmp_path)
    assert 'dataset_meta' not in meta
