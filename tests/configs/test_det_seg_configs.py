"""Every shipped detection / segmentation config builds and runs one training and one test step on the CPU.

Configs are loaded as users load them, with SyncBN switched to BN (:func:`dynconv_mm.apis.replace_syncbn`,
what the tools do without a GPU) and the pretrained-checkpoint ``init_cfg`` removed.

* Full size: each config's backbone is built as configured, its parameter count checked against the
  published one where there is one, and its outputs must have the channels the neck / heads expect.
* One training and one test step of the whole detector / segmentor, with two small random images with
  boxes and masks (mmdet) or label maps (mmseg), fewer sampled proposals, and - for the backbones whose
  depth is a parameter - one block per stage (a KernelWarehouse train step mixes every warehouse cell
  for every sample, which takes about a minute per full-size model on two CPU cores). Widths, KW options,
  necks and heads are the configured ones. The optimizer is built from each config's ``optim_wrapper``
  (the layer-decay constructor and the ``norm`` no-decay keys are exercised); the step must change the
  trainable parameters of backbone and heads and leave frozen ones alone; hooks the config lists
  (PEDConv's AuxLossHook) are attached.
"""
from __future__ import annotations

import copy
import functools
import glob
import math
import os.path as osp

import pytest
import torch

pytest.importorskip('mmdet', reason='mmdet is not installed')
pytest.importorskip('mmseg', reason='mmseg is not installed')
pytest.importorskip('mmcv.ops', reason='mmcv was built without its ops (RoIAlign, NMS)')

from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.structures import InstanceData, PixelData  # noqa: E402

import dynconv_mm  # noqa: E402,F401
from dynconv_mm.apis import replace_syncbn  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DET_PATTERNS = ('kernelwarehouse/mask-rcnn_*.py', 'dwnet/mask-rcnn_*.py', 'dwnet/cascade-mask-rcnn_*.py',
                'pedconv/mask-rcnn_*.py', 'orepa/mask-rcnn_*.py', 'doconv/mask-rcnn_*.py')
SEG_PATTERNS = ('kernelwarehouse/upernet_*.py', 'dwnet/upernet_*.py')


def _configs(patterns):
    files = sorted({f for p in patterns for f in glob.glob(osp.join(ROOT, 'configs', p))})
    return [osp.relpath(f, osp.join(ROOT, 'configs')) for f in files]


DET_CONFIGS = _configs(DET_PATTERNS)
SEG_CONFIGS = _configs(SEG_PATTERNS)


def test_every_config_is_collected():
    assert len(DET_CONFIGS) == 19, DET_CONFIGS
    assert len(SEG_CONFIGS) == 5, SEG_CONFIGS


def _strip_pretrained(obj) -> int:
    """Remove every ``init_cfg=dict(type='Pretrained', ...)`` (in place); returns how many."""
    n = 0
    if isinstance(obj, dict):
        if isinstance(obj.get('init_cfg'), dict) and obj['init_cfg'].get('type') == 'Pretrained':
            obj.pop('init_cfg')
            n += 1
        for v in obj.values():
            n += _strip_pretrained(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            n += _strip_pretrained(v)
    return n


@functools.lru_cache(maxsize=None)
def _parsed(rel: str) -> Config:
    return Config.fromfile(osp.join(ROOT, 'configs', rel))


def load_config(rel: str) -> Config:
    """The config as users load it (parsed once per test session; a private copy each time)."""
    return copy.deepcopy(_parsed(rel))


def load_cpu_config(rel: str) -> Config:
    cfg = load_config(rel)
    assert 'dynconv_mm' in cfg.custom_imports['imports']
    assert cfg.custom_imports['allow_failed_imports'] is False
    had_syncbn = 'SyncBN' in repr(cfg.model.to_dict())
    assert (replace_syncbn(cfg) > 0) == had_syncbn
    assert 'SyncBN' not in repr(cfg.model.to_dict())
    if rel.startswith('dwnet/'):   # the official DWNet models use SyncBN in the backbone
        assert had_syncbn
    assert _strip_pretrained(cfg.model) >= 1, f'{rel}: expected a pretrained backbone init_cfg'
    cfg.model.pop('pretrained', None)
    if cfg.default_scope == 'mmdet':
        _fewer_proposals(cfg.model)
    return cfg


def test_det_seg_configs_keep_cudnn_benchmark_as_their_library():
    """Detection: multi-scale inputs, cuDNN would re-time its algorithms at every new size (off, mmdet's
    default); segmentation trains on fixed 512 x 512 crops (on, mmseg's default)."""
    for rel in DET_CONFIGS:
        assert _parsed(rel).env_cfg.cudnn_benchmark is False, rel
    for rel in SEG_CONFIGS:
        assert _parsed(rel).env_cfg.cudnn_benchmark is True, rel


def _fewer_proposals(model_cfg) -> None:
    """Sample fewer proposals and RoIs (the networks are unchanged): the full 1000 proposals / 512 RoIs per
    image would spend minutes in the RoI heads on two CPU cores."""
    train, test = model_cfg.train_cfg, model_cfg.test_cfg
    train.rpn_proposal.update(nms_pre=200, max_per_img=50)
    test.rpn.update(nms_pre=200, max_per_img=50)
    test.rcnn.max_per_img = 10
    for stage in (train.rcnn if isinstance(train.rcnn, list) else [train.rcnn]):
        stage.sampler.num = 32


def _registry(cfg: Config):
    init_default_scope(cfg.default_scope)
    if cfg.default_scope == 'mmdet':
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    return MODELS


def build(cfg: Config):
    """The whole model (its backbone's ``init_weights`` is run by :func:`test_full_size_backbone`)."""
    models = _registry(cfg)
    torch.manual_seed(0)
    return models.build(cfg.model)


def one_block_per_stage(backbone_cfg) -> bool:
    """Reduce a backbone config to one block per stage where the depth is a parameter (in place)."""
    t = backbone_cfg.type
    if t == 'KWResNet':
        backbone_cfg.stage_blocks = (1, 1, 1, 1)
    elif t in ('KWConvNeXt', 'mmpretrain.ConvNeXt'):
        backbone_cfg.arch = dict(depths=[1, 1, 1, 1], channels=[96, 192, 384, 768])
    elif t == 'DWNet':
        backbone_cfg.depths = [1, 1, 1, 1]
    else:
        return False
    return True


# published backbone parameters (millions) of the models in the configs, without ImageNet heads, where
# the papers' tables give them: KW ResNet-50 / ConvNeXt-T / MobileNetV2 ImageNet counts minus the
# classifier (OFFICIAL_NOTES 2.9, 2.12), DWNet ImageNet counts minus head and final LayerNorm plus the four
# BatchNorm output norms (7.1)
PUBLISHED_BACKBONE_M = {
    'kernelwarehouse/mask-rcnn_r50_fpn_1x_coco.py': 25.56 - 2.05,
    'kernelwarehouse/mask-rcnn_kw1x-r50_fpn_1x_coco.py': 28.05 - 2.05,
    'kernelwarehouse/mask-rcnn_kw4x-r50_fpn_1x_coco.py': 102.02 - 2.05,
    'kernelwarehouse/mask-rcnn_mobilenet-v2_fpn_1x_coco.py': 3.50 - 1.28,
    'kernelwarehouse/mask-rcnn_kw1x-mobilenet-v2_fpn_1x_coco.py': 5.17 - 1.28,
    'kernelwarehouse/mask-rcnn_kw4x-mobilenet-v2_fpn_1x_coco.py': 11.38 - 1.28,
    'kernelwarehouse/mask-rcnn_convnext-t_fpn_1x_coco.py': 28.59 - 0.77,
    'kernelwarehouse/mask-rcnn_kw1x-convnext-t_fpn_1x_coco.py': 39.37 - 0.77,
    'dwnet/cascade-mask-rcnn_dwnet-t_fpn_4conv1fc-giou_ms-crop-3x_coco.py': 24.17 - 0.77,
    'dwnet/cascade-mask-rcnn_dynamic-dwnet-t_fpn_4conv1fc-giou_ms-crop-3x_coco.py': 51.13 - 0.77,
    'dwnet/cascade-mask-rcnn_dwnet-b_fpn_4conv1fc-giou_ms-crop-3x_coco.py': 74.35 - 1.03,
    'dwnet/cascade-mask-rcnn_dynamic-dwnet-b_fpn_4conv1fc-giou_ms-crop-3x_coco.py': 161.60 - 1.03,
}


def _expected_in_channels(cfg: Config):
    if cfg.default_scope == 'mmdet':
        return list(cfg.model.neck.in_channels)
    return list(cfg.model.decode_head.in_channels)


_BACKBONE_PARAMS: dict = {}   # backbone config -> parameters (millions)


@pytest.mark.parametrize('rel', DET_CONFIGS + SEG_CONFIGS)
def test_full_size_backbone(rel):
    """The configured backbone builds and initialises at full size, with the published parameter count."""
    cfg = load_cpu_config(rel)
    key = cfg.default_scope + repr(cfg.model.backbone.to_dict())
    if key not in _BACKBONE_PARAMS:   # DWNet and ConvNeXt backbones are shared by several configs
        backbone = _registry(cfg).build(cfg.model.backbone)
        backbone.init_weights()
        _BACKBONE_PARAMS[key] = sum(p.numel() for p in backbone.parameters()) / 1e6
    n = _BACKBONE_PARAMS[key]
    if rel in PUBLISHED_BACKBONE_M:
        assert n == pytest.approx(PUBLISHED_BACKBONE_M[rel], abs=0.02), f'{rel}: {n:.3f}M parameters'


def _check_backbone_outputs(cfg, model, size: int = 64):
    """The backbone (configured widths and out_indices) gives the channels and strides the neck / heads expect."""
    with torch.no_grad():
        outs = model.backbone(torch.randn(1, 3, size, size))
    assert [o.shape[1] for o in outs] == _expected_in_channels(cfg)
    assert [o.shape[-1] for o in outs] == [size // 4, size // 8, size // 16, size // 32]
    if cfg.default_scope == 'mmseg':
        assert cfg.model.auxiliary_head.in_channels == _expected_in_channels(cfg)[2]


def det_batch(num_images: int = 2, size: int = 64):
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    g = torch.Generator().manual_seed(1)
    samples, inputs = [], []
    for i in range(num_images):
        s = DetDataSample()
        s.set_metainfo(dict(img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size),
                            scale_factor=(1.0, 1.0), flip=False, img_id=i))
        gt = InstanceData()
        gt.bboxes = torch.tensor([[4.0, 6.0, 40.0, 36.0], [18.0, 14.0, 60.0, 58.0]])
        gt.labels = torch.tensor([3, 17])
        masks = torch.zeros(2, size, size, dtype=torch.uint8)
        masks[0, 6:36, 4:40] = 1
        masks[1, 14:58, 18:60] = 1
        gt.masks = BitmapMasks(masks.numpy(), size, size)
        s.gt_instances = gt
        samples.append(s)
        inputs.append(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g))
    return dict(inputs=inputs, data_samples=samples)


def seg_batch(num_images: int = 2, size: int = 64):
    from mmseg.structures import SegDataSample
    g = torch.Generator().manual_seed(2)
    samples, inputs = [], []
    for _ in range(num_images):
        s = SegDataSample()
        seg = torch.randint(0, 150, (1, size, size), generator=g)
        seg[:, :4] = 255   # ignored pixels
        s.gt_sem_seg = PixelData(data=seg)
        s.set_metainfo(dict(img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size)))
        samples.append(s)
        inputs.append(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g))
    return dict(inputs=inputs, data_samples=samples)


def _train_step(cfg, model, data):
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import HOOKS
    optim = build_optim_wrapper(model, cfg.optim_wrapper)
    hooks = [HOOKS.build(h) for h in cfg.get('custom_hooks', [])]
    for h in hooks:
        h.attach(model)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    log_vars = model.train_step(data, optim)
    assert math.isfinite(float(log_vars['loss'].detach())), log_vars
    params = dict(model.named_parameters())
    changed = [n for n, v in trainable.items() if not torch.equal(v, params[n])]
    assert any(n.startswith('backbone.') for n in changed), 'the backbone was not updated'
    assert any(not n.startswith('backbone.') for n in changed), 'the heads were not updated'
    for n, v in frozen.items():
        assert torch.equal(v, params[n]), f'frozen parameter {n} changed'
    for h in hooks:
        h.detach()
    return log_vars


@pytest.mark.parametrize('rel', DET_CONFIGS)
def test_detection_config_trains_and_tests(rel):
    cfg = load_cpu_config(rel)
    assert cfg.default_scope == 'mmdet'
    one_block_per_stage(cfg.model.backbone)
    model = build(cfg)
    data = det_batch()
    log_vars = _train_step(cfg, model, data)
    assert any(k.endswith('loss_mask') for k in log_vars), sorted(log_vars)
    if 'cascade' in rel:
        assert {'s0.loss_bbox', 's1.loss_bbox', 's2.loss_bbox'} <= set(log_vars), sorted(log_vars)
    if 'pedconv' in rel:   # the info-max term is added by the config's AuxLossHook
        assert float(log_vars['loss_aux_infomax']) > 0
    model.eval()
    with torch.no_grad():
        out = model.test_step(det_batch(num_images=1))
    _check_backbone_outputs(cfg, model)
    pred = out[0].pred_instances
    assert pred.bboxes.shape[-1] == 4 and len(pred.bboxes) == len(pred.scores) == len(pred.masks)
    assert pred.masks.shape[-2:] == (64, 64)


@pytest.mark.parametrize('rel', SEG_CONFIGS)
def test_segmentation_config_trains_and_tests(rel):
    cfg = load_cpu_config(rel)
    assert cfg.default_scope == 'mmseg'
    assert cfg.model.decode_head.num_classes == cfg.model.auxiliary_head.num_classes == 150
    cfg.model.data_preprocessor.size = (64, 64)   # the configs pad to the 512x512 training crop
    one_block_per_stage(cfg.model.backbone)
    model = build(cfg)
    log_vars = _train_step(cfg, model, seg_batch())
    assert {'decode.loss_ce', 'aux.loss_ce'} <= set(log_vars), sorted(log_vars)
    model.eval()
    with torch.no_grad():
        out = model.test_step(seg_batch(num_images=1))
    assert out[0].pred_sem_seg.data.shape == (1, 64, 64)
    _check_backbone_outputs(cfg, model)
    assert int(out[0].pred_sem_seg.data.max()) < 150


def _milestones(cfg):
    return next(s for s in cfg.param_scheduler if s['type'] == 'MultiStepLR')['milestones']


@pytest.mark.parametrize('rel', DET_CONFIGS + SEG_CONFIGS)
def test_recipe(rel):
    """The optimisation recipe of each config is the official one (OFFICIAL_NOTES 2.11, 7.3) or mmdet's 1x."""
    cfg = load_config(rel)
    opt = cfg.optim_wrapper.optimizer
    if rel.startswith(('pedconv/', 'orepa/', 'doconv/')):
        assert (opt.type, opt.lr, opt.weight_decay, cfg.train_cfg.max_epochs) == ('SGD', 0.02, 0.0001, 12)
        assert _milestones(cfg) == [8, 11]
        return
    assert opt.type == 'AdamW' and opt.betas == (0.9, 0.999)
    if 'upernet' in rel:
        assert cfg.train_cfg.max_iters == 160000 and cfg.train_dataloader.batch_size == 2
        warmup, poly = cfg.param_scheduler
        assert (warmup.type, warmup.end, warmup.start_factor) == ('LinearLR', 1500, 1e-6)
        assert (poly.type, poly.power, poly.eta_min, poly.end) == ('PolyLR', 1.0, 0.0, 160000)
        assert cfg.model.auxiliary_head.in_index == 2 and cfg.model.auxiliary_head.loss_decode.loss_weight == 0.4
        if rel.startswith('dwnet/'):
            assert (opt.lr, opt.weight_decay, cfg.model.backbone.drop_path_rate) == (6e-5, 0.01, 0.3)
            assert cfg.optim_wrapper.paramwise_cfg.custom_keys['norm'].decay_mult == 0
            assert cfg.model.test_cfg.mode == 'whole'
        return
    pipeline = cfg.train_dataloader.dataset.pipeline
    choice = next(t for t in pipeline if t['type'] == 'RandomChoice')
    assert [s[0] for s in choice.transforms[0][0].scales] == list(range(480, 801, 32))
    assert choice.transforms[1][1].crop_size == (384, 600)
    assert (opt.lr, opt.weight_decay) == (1e-4, 0.05)
    if rel.startswith('kernelwarehouse/'):
        assert cfg.train_cfg.max_epochs == 12
        convnext = 'convnext' in rel
        assert _milestones(cfg) == ([9, 11] if convnext else [8, 11])
        if convnext:
            assert cfg.optim_wrapper.constructor == 'LearningRateDecayOptimizerConstructor'
            assert cfg.optim_wrapper.paramwise_cfg == dict(decay_rate=0.95, decay_type='layer_wise', num_layers=6)
            assert cfg.model.backbone.drop_path_rate == 0.4 and cfg.model.backbone.layer_scale_init_value == 1.0
        else:
            assert cfg.optim_wrapper.paramwise_cfg.custom_keys['norm'].decay_mult == 0
            assert cfg.model.backbone.norm_eval is True
        assert 'custom_hooks' not in cfg   # KW layers stay at temperature 0, their construction value
    else:   # DWNet 3x
        assert cfg.train_cfg.max_epochs == 36 and _milestones(cfg) == [27, 33]
        assert cfg.model.backbone.drop_path_rate == (0.2 if rel.split('_')[1].endswith('-t') else 0.3)
        if rel.startswith('dwnet/cascade'):
            heads = cfg.model.roi_head.bbox_head
            assert [h.num_shared_convs for h in heads] == [4, 4, 4] and [h.num_shared_fcs for h in heads] == [1, 1, 1]
            assert all(h.loss_bbox == dict(type='GIoULoss', loss_weight=10.0) and h.reg_decoded_bbox for h in heads)
            assert all(h.norm_cfg.type == 'SyncBN' for h in heads)
