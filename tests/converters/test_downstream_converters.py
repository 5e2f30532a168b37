"""Official detector / segmentor checkpoints (mmdet 2.x, mmseg 0.x key layout) -> our mmdet 3.x / mmseg 1.x models.

Round trip: a model is built from one of our configs (KW ResNet-50 and ConvNeXt-T with two blocks per
stage, which have every kind of key of the full depth; a KW forward mixes every warehouse cell and takes
tens of seconds at full size on two CPU cores), its state dict is rewritten into the layout the official
code saves (written here from the official module names, independently of the converter), converted back
with :func:`convert_downstream`, loaded strictly into a freshly built model, and both models must give the
same backbone features and head outputs. Also: unused official keys are dropped with a reason, unknown keys
and missing keys are reported by name, and the command-line tool writes a loadable checkpoint or exits
with 1.
"""
from __future__ import annotations

import os.path as osp
import re
from collections import OrderedDict

import pytest
import torch

pytest.importorskip('mmdet', reason='mmdet is not installed')
pytest.importorskip('mmseg', reason='mmseg is not installed')
pytest.importorskip('mmcv.ops', reason='mmcv was built without its ops (RoIAlign, NMS)')

from conftest import randomize_norms  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402

import dynconv_mm  # noqa: E402,F401
from dynconv_mm.apis import replace_syncbn  # noqa: E402
from dynconv_mm.converters.common import ConversionError  # noqa: E402
from dynconv_mm.converters.downstream import (  # noqa: E402
    convert_downstream,
    detect_downstream_backbone,
    detect_downstream_task,
    load_downstream_checkpoint,
)

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))

# ---------------------------------------------------------------------------------------------------------
# our keys -> the official keys (KernelWarehouse detection fork of mmdet 2.11, DWNet mmdet 2.11 / mmseg 0.11)

# torchvision MobileNetV2: (expand ratio, blocks) per row; ``features.0`` is the stem, ``features.18`` the last 1x1
_MBV2_ROWS = ((1, 1), (6, 2), (6, 3), (6, 4), (6, 3), (6, 3), (6, 1))


def _official_mobilenetv2_key(key: str) -> str:
    m = re.fullmatch(r'conv1\.(conv|bn)\.(.+)', key)
    if m:
        return f'features.0.{0 if m[1] == "conv" else 1}.{m[2]}'
    m = re.fullmatch(r'conv2\.(conv|bn)\.(.+)', key)
    if m:
        return f'features.18.{0 if m[1] == "conv" else 1}.{m[2]}'
    m = re.fullmatch(r'layer(\d)\.(\d+)\.conv\.(\d)\.(conv|bn)\.(.+)', key)
    assert m, key
    row, block, pos, kind, rest = int(m[1]) - 1, int(m[2]), int(m[3]), m[4], m[5]
    feature = 1 + sum(n for _, n in _MBV2_ROWS[:row]) + block
    last = 1 if _MBV2_ROWS[row][0] == 1 else 2   # position of the linear projection in our block
    if pos < last:   # ConvBNReLU(conv, bn, relu6)
        return f'features.{feature}.conv.{pos}.{0 if kind == "conv" else 1}.{rest}'
    return f'features.{feature}.conv.{pos if kind == "conv" else pos + 1}.{rest}'   # bare conv, then bn


def _official_convnext(key: str, value: torch.Tensor):
    names = {'depthwise_conv': 'dwconv', 'pointwise_conv1': 'pwconv1', 'pointwise_conv2': 'pwconv2'}
    m = re.fullmatch(r'(stages\.\d+\.\d+)\.(depthwise_conv|pointwise_conv1|pointwise_conv2)\.(.+)', key)
    if m:
        return f'{m[1]}.{names[m[2]]}.{m[3]}', value
    if re.fullmatch(r'stages\.\d+\.\d+\.gamma', key):
        return key, value.reshape(1, -1, 1, 1)   # the official KW ConvNeXt keeps NCHW layer scales
    return key, value


def to_official(state_dict: dict, backbone: str) -> OrderedDict:
    """Our detector / segmentor state dict in the layout of the official checkpoints."""
    out = OrderedDict()
    for key, value in state_dict.items():
        if key.startswith('backbone.'):
            body = key[len('backbone.'):]
            if backbone == 'mobilenetv2' and not body.startswith('warehouse_manager.'):
                body = _official_mobilenetv2_key(body)
            elif backbone == 'convnext':
                body, value = _official_convnext(body, value)
            key = 'backbone.' + body
        out[key] = value.clone()
    g = torch.Generator().manual_seed(3)
    if backbone == 'resnet':   # the official detection backbones keep their unused ImageNet classifiers
        out['backbone.fc.weight'] = torch.randn(1000, 2048, generator=g)
        out['backbone.fc.bias'] = torch.randn(1000, generator=g)
    if backbone == 'mobilenetv2':
        out['backbone.classifier.weight'] = torch.randn(1000, 1280, generator=g)
        out['backbone.classifier.bias'] = torch.randn(1000, generator=g)
    return out


# ---------------------------------------------------------------------------------------------------------
def build_from_config(rel: str, seed: int):
    cfg = Config.fromfile(osp.join(ROOT, 'configs', rel))
    replace_syncbn(cfg)
    cfg.model.backbone.pop('init_cfg', None)
    if cfg.model.backbone.type == 'KWResNet':
        cfg.model.backbone.stage_blocks = (2, 2, 2, 2)
    elif cfg.model.backbone.type == 'KWConvNeXt':
        cfg.model.backbone.arch = dict(depths=[2, 2, 2, 2], channels=[96, 192, 384, 768])
    if cfg.default_scope == 'mmseg':
        cfg.model.data_preprocessor.size = (64, 64)
    else:   # fewer proposals: the comparison does not need 1000 RoIs
        cfg.model.test_cfg.rpn.update(nms_pre=200, max_per_img=50)
    init_default_scope(cfg.default_scope)
    if cfg.default_scope == 'mmdet':
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    torch.manual_seed(seed)
    model = MODELS.build(cfg.model)
    model.eval()
    return model


def _det_inputs(size: int = 64):
    from mmdet.structures import DetDataSample
    g = torch.Generator().manual_seed(4)
    img = torch.randn(1, 3, size, size, generator=g)
    s = DetDataSample()
    s.set_metainfo(dict(img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size),
                        scale_factor=(1.0, 1.0), batch_input_shape=(size, size)))
    return img, [s]


def _assert_same(a, b, what: str):
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f'{what}[{i}]')
    else:
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f'{what}: {m}')


ROUND_TRIPS = [
    ('kernelwarehouse/mask-rcnn_kw1x-r50_fpn_1x_coco.py', 'resnet', 'det'),
    ('kernelwarehouse/mask-rcnn_kw1x-mobilenet-v2_fpn_1x_coco.py', 'mobilenetv2', 'det'),
    ('kernelwarehouse/mask-rcnn_kw1x-convnext-t_fpn_1x_coco.py', 'convnext', 'det'),
    ('dwnet/cascade-mask-rcnn_dynamic-dwnet-t_fpn_4conv1fc-giou_ms-crop-3x_coco.py', 'dwnet', 'det'),
    ('dwnet/upernet_dwnet-t_8xb2-160k_ade20k-512x512.py', 'dwnet', 'seg'),
]


@pytest.fixture(scope='module')
def built():
    cache = {}

    def get(rel):
        if rel not in cache:
            cache[rel] = (build_from_config(rel, seed=0), build_from_config(rel, seed=1))
            randomize_norms(cache[rel][0], seed=5)
        return cache[rel]
    return get


@pytest.mark.parametrize('rel,backbone,task', ROUND_TRIPS, ids=[r[0].split('/')[1][:-3] for r in ROUND_TRIPS])
def test_round_trip_gives_the_same_model(built, rel, backbone, task):
    original, fresh = built(rel)
    ours = original.state_dict()
    before = {k: v.clone() for k, v in fresh.state_dict().items() if v.is_floating_point()}
    official = to_official(ours, backbone)
    assert detect_downstream_backbone(official) == backbone
    assert detect_downstream_task(official) == task

    converted, report = convert_downstream(official, model_keys=fresh.state_dict())
    report.check()
    assert set(converted) == set(ours)
    extra = {'resnet': {'backbone.fc.weight', 'backbone.fc.bias'},
             'mobilenetv2': {'backbone.classifier.weight', 'backbone.classifier.bias'}}.get(backbone, set())
    assert set(report.dropped) == extra
    assert all('classifier' in reason for reason in report.dropped.values())
    fresh.load_state_dict(converted, strict=True)

    with torch.no_grad():
        if task == 'det':
            img, samples = _det_inputs()
            feats = original.backbone(img)
            _assert_same(feats, fresh.backbone(img), 'backbone features')
            outs = []
            for model in (original, fresh):   # TwoStageDetector._forward after the backbone
                x = model.neck(feats)
                proposals = model.rpn_head.predict(x, samples, rescale=False)
                outs.append((x, model.rpn_head(x), model.roi_head.forward(x, proposals, samples)))
            _assert_same(outs[0], outs[1], 'neck, RPN and RoI head outputs')
        else:
            img = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
            feats = original.extract_feat(img)
            _assert_same(feats, fresh.extract_feat(img), 'backbone features')
            _assert_same(original.decode_head(feats), fresh.decode_head(feats), 'decode head logits')
            _assert_same(original.auxiliary_head(feats), fresh.auxiliary_head(feats), 'auxiliary head logits')
    # the weights really came from the checkpoint: the fresh model differed before loading
    differed = [k for k, v in before.items() if not torch.equal(v, ours[k])]
    assert any(k.startswith('backbone.') for k in differed) and any(k.startswith(('roi_head.', 'decode_head.'))
                                                                   for k in differed)


def test_official_names_are_converted(built):
    official = to_official(built(ROUND_TRIPS[1][0])[0].state_dict(), 'mobilenetv2')
    converted, report = convert_downstream(official, backbone='mobilenetv2', task='det')
    assert report.mapped['backbone.features.0.1.running_var'] == 'backbone.conv1.bn.running_var'
    assert report.mapped['backbone.features.3.conv.3.weight'] == 'backbone.layer2.1.conv.2.bn.weight'
    assert report.mapped['backbone.features.18.0.attention.fc1.weight'] == 'backbone.conv2.conv.attention.fc1.weight'
    assert report.mapped['roi_head.mask_head.conv_logits.weight'] == 'roi_head.mask_head.conv_logits.weight'

    official = to_official(built(ROUND_TRIPS[2][0])[0].state_dict(), 'convnext')
    converted, report = convert_downstream(official)
    assert official['backbone.stages.0.0.gamma'].shape == (1, 96, 1, 1)
    assert converted['backbone.stages.0.0.gamma'].shape == (96,)
    assert report.mapped['backbone.stages.2.1.dwconv.attention.fc2.weight'] == \
        'backbone.stages.2.1.depthwise_conv.attention.fc2.weight'
    assert report.mapped['backbone.norm2.bias'] == 'backbone.norm2.bias'

    official = to_official(built(ROUND_TRIPS[3][0])[0].state_dict(), 'dwnet')
    _, report = convert_downstream(official)
    assert 'roi_head.bbox_head.2.shared_convs.3.bn.running_mean' in report.mapped
    assert 'backbone.norm3.num_batches_tracked' in report.mapped
    assert 'backbone.layers.2.blocks.5.attn2conv.conv.conv2.weight' in report.mapped


def test_unknown_and_missing_keys_are_reported_by_name(built):
    original, fresh = built(ROUND_TRIPS[3][0])
    official = to_official(original.state_dict(), 'dwnet')
    official['backbone.absolute_pos_embed'] = torch.zeros(1, 96, 56, 56)
    official['roi_head.bbox_head.0.fc_extra.weight'] = torch.zeros(4, 4)
    del official['neck.fpn_convs.0.conv.weight']
    _, report = convert_downstream(official, model_keys=fresh.state_dict())
    assert set(report.unplaced) == {'backbone.absolute_pos_embed', 'roi_head.bbox_head.0.fc_extra.weight'}
    assert report.missing == ['neck.fpn_convs.0.conv.weight']
    with pytest.raises(ConversionError, match='backbone.absolute_pos_embed') as e:
        report.check()
    assert 'neck.fpn_convs.0.conv.weight' in str(e.value)
    assert 'fc_extra' in str(e.value)

    # a segmentor checkpoint given as a detector: its heads are unplaced, named in the report
    seg = to_official(built(ROUND_TRIPS[4][0])[0].state_dict(), 'dwnet')
    _, report = convert_downstream(seg, task='det')
    assert 'decode_head.conv_seg.weight' in report.unplaced
    with pytest.raises(ConversionError, match='decode_head.conv_seg.weight'):
        report.check()


def test_shape_mismatch_is_an_error(built):
    original, _ = built(ROUND_TRIPS[4][0])
    official = to_official(original.state_dict(), 'dwnet')
    official['decode_head.conv_seg.weight'] = torch.zeros(19, 512, 1, 1)   # a Cityscapes head
    with pytest.raises(ConversionError, match='decode_head.conv_seg.weight'):
        convert_downstream(official, model_keys=original.state_dict())


def test_detection_rejects_unknown_layouts():
    with pytest.raises(ConversionError, match='cannot tell the backbone'):
        detect_downstream_backbone({'backbone.stem.weight': torch.zeros(1)})
    with pytest.raises(ConversionError, match='cannot tell the task'):
        detect_downstream_task({'backbone.layer1.0.conv1.weight': torch.zeros(1)})
    with pytest.raises(ValueError, match='unknown downstream backbone'):
        convert_downstream({'backbone.layer1.0.conv1.weight': torch.zeros(1)}, backbone='vit', task='det')


def test_command_line_tool(built, tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        'downstream_to_mm', osp.join(ROOT, 'tools', 'model_converters', 'downstream_to_mm.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    original, fresh = built(ROUND_TRIPS[4][0])
    official = to_official(original.state_dict(), 'dwnet')
    src = tmp_path / 'upernet_dwnet_tiny.pth'
    torch.save({'meta': {'mmseg_version': '0.11.0', 'CLASSES': ('wall', 'building')}, 'state_dict': official,
                'optimizer': {'state': {}, 'param_groups': []}}, src)
    dst = tmp_path / 'out' / 'converted.pth'
    rel = ROUND_TRIPS[4][0]
    assert tool.main([str(src), str(dst), '--config', osp.join(ROOT, 'configs', rel)]) == 0
    out = torch.load(dst, weights_only=True)
    sd = out['state_dict']
    assert set(sd) == set(original.state_dict())
    # the class names travel with the checkpoint: mmseg's init_model (which the inferencer uses) reads them
    import warnings

    from mmseg.apis import init_model
    from mmseg.datasets import ADE20KDataset
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        model = init_model(osp.join(ROOT, 'configs', rel), str(dst), device='cpu')
    assert not [w for w in caught if 'dataset_meta' in str(w.message)]
    assert list(model.dataset_meta['classes']) == list(ADE20KDataset.METAINFO['classes'])
    assert out['meta']['dataset_meta']['classes'] == list(ADE20KDataset.METAINFO['classes'])
    assert torch.equal(load_downstream_checkpoint(str(src))['decode_head.conv_seg.weight'],
                       sd['decode_head.conv_seg.weight'])

    official['decode_head.unknown.weight'] = torch.zeros(1)
    torch.save({'state_dict': official}, src)
    bad = tmp_path / 'bad.pth'
    assert tool.main([str(src), str(bad), '--task', 'seg']) == 1
    assert not bad.exists()
