"""PEDResNet: structure, backbone options, the official checkpoint through the converter, and training
through the auxiliary-loss path."""
import pytest
import torch
from torch import nn

from dynconv_mm.backbones import PEDResNet
from dynconv_mm.converters.common import ConversionError, extract_state_dict
from dynconv_mm.converters.pedconv import convert_pedconv_resnet
from dynconv_mm.engine.aux_loss import AuxLossHook, collect_aux_losses
from dynconv_mm.layers import PEDConv2d


def tiny(**kw):
    cfg = dict(depth=18, widen_factor=0.25, out_indices=(0, 1, 2, 3))
    cfg.update(kw)
    return PEDResNet(**cfg)


def classifier_cfg(width=0.25, num_classes=1000):
    return dict(
        type='ImageClassifier', _scope_='mmpretrain',
        backbone=dict(type='PEDResNet', depth=18, widen_factor=width),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=num_classes, in_channels=int(512 * width),
                  loss=dict(type='CrossEntropyLoss')))


def test_structure_matches_official_resnet18():
    m = tiny()
    peds = [n for n, mod in m.named_modules() if isinstance(mod, PEDConv2d)]
    assert len(peds) == 16  # every block conv, nothing else
    assert isinstance(m.conv1, nn.Conv2d) and not isinstance(m.conv1, PEDConv2d)
    assert type(m.layer2[0].downsample[0]) is nn.Conv2d
    assert m.layer2[0].conv1.stride == (2, 2)
    assert m.out_channels == [16, 32, 64, 128]
    outs = m(torch.randn(2, 3, 64, 48))
    assert [tuple(o.shape) for o in outs] == [(2, 16, 16, 12), (2, 32, 8, 6), (2, 64, 4, 3), (2, 128, 2, 2)]
    collect_aux_losses(m)


def test_bottleneck_depth50():
    m = PEDResNet(depth=50, widen_factor=0.125, out_indices=(3, ))
    assert len([1 for mod in m.modules() if isinstance(mod, PEDConv2d)]) == 3 * 16
    assert m.out_channels[-1] == 256
    m.eval()
    assert m(torch.randn(1, 3, 32, 32))[0].shape == (1, 256, 1, 1)


def test_frozen_stages_and_norm_eval():
    m = tiny(frozen_stages=1, norm_eval=True)
    m.train()
    assert not m.conv1.weight.requires_grad and not m.layer1[0].conv1.weight.requires_grad
    assert m.layer2[0].conv1.weight.requires_grad
    assert not m.layer1[0].conv1.training  # frozen PEDConv: attention means, no info-max loss
    assert m.layer2[0].conv1.training
    assert not m.layer2[0].bn1.training  # norm_eval
    m(torch.randn(2, 3, 32, 32))
    assert not m.layer1[0].conv1._aux_pending and m.layer2[0].conv1._aux_pending
    collect_aux_losses(m)


def test_conv_cfg_options_reach_the_layers():
    m = tiny(conv_cfg=dict(type='PEDConv2d', aux_loss_weight=0.01, noise_std=0.0))
    assert m.layer3[1].conv2.aux_loss_weight == 0.01 and m.layer3[1].conv2.attn.noise_std == 0.0


def test_bad_arguments():
    with pytest.raises(ValueError, match='PEDResNet: depth=20'):
        PEDResNet(depth=20)
    with pytest.raises(ValueError, match='PEDResNet: out_indices=.4,.'):
        PEDResNet(out_indices=(4, ))
    with pytest.raises(ValueError, match='PEDResNet: frozen_stages'):
        PEDResNet(frozen_stages=5)


def test_official_init():
    m = tiny()
    m.init_weights()
    assert torch.all(m.layer1[0].bn1.weight == 0.5) and torch.all(m.bn1.bias == 0)
    assert abs(m.layer4[0].conv1.attn.fc_share.weight.std().item() - 0.01) < 5e-3


def _official(golden):
    g = golden('pedconv_resnet18_w025.pt')
    assert g['constructor'] == 'resnet18(width_ratio=0.25)'
    return g


def test_converter_accounts_for_every_key(golden):
    g = _official(golden)
    sd = g['state_dict']
    ckpt = {'epoch': 1, 'arch': 'resnet18', 'state_dict': {'module.' + k: v for k, v in sd.items()}}
    src = extract_state_dict(ckpt)
    assert list(src) == list(sd)
    m = PEDResNet(depth=18, widen_factor=0.25)
    new, report = convert_pedconv_resnet(src, backbone_prefix='', head=False, expected=m.state_dict())
    report.check()
    assert set(report.dropped) == {'fc.weight', 'fc.bias'}
    assert 'layer1.0.conv1.attn.decoder.0.weight' in new  # training state kept
    # same parameter count as the official model (backbone + its 128 -> 1000 classifier)
    assert sum(p.numel() for p in m.parameters()) + 128 * 1000 + 1000 == g['num_params']
    # a deep-stem checkpoint is refused, naming the keys
    bad = dict(src)
    bad['conv2.weight'] = torch.zeros(1)
    with pytest.raises(ConversionError, match='conv2.weight'):
        convert_pedconv_resnet(bad)[1].check()


def test_golden_pedconv_resnet18_w025_image_classifier(golden):
    pytest.importorskip('mmpretrain', reason='mmpretrain is not installed')
    from mmpretrain.registry import MODELS

    import dynconv_mm  # noqa: F401
    g = _official(golden)
    model = MODELS.build(classifier_cfg())
    new, report = convert_pedconv_resnet(g['state_dict'], expected=model.state_dict())
    report.check()
    model.load_state_dict(new)
    model.eval()
    with torch.no_grad():
        out = model(g['input'], mode='tensor')
    ref = g['outputs'][0.0]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_image_classifier_train_step_logs_infomax():
    pytest.importorskip('mmpretrain', reason='mmpretrain is not installed')
    from mmengine.optim import OptimWrapper
    from mmpretrain.registry import MODELS
    from mmpretrain.structures import DataSample

    import dynconv_mm  # noqa: F401
    cfg = classifier_cfg(width=0.125, num_classes=3)
    cfg['data_preprocessor'] = dict(type='ClsDataPreprocessor', num_classes=3)
    model = MODELS.build(cfg)
    model.init_weights()
    model.train()
    hook = AuxLossHook()
    assert hook.attach(model) == 16
    optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.01))
    data = dict(inputs=[torch.randint(0, 255, (3, 40, 40), dtype=torch.uint8) for _ in range(2)],
                data_samples=[DataSample().set_gt_label(i) for i in range(2)])
    dec = model.backbone.layer4[1].conv2.attn.decoder[2].bias.detach().clone()
    log_vars = model.train_step(data, optim)
    assert log_vars['loss_aux_infomax'].item() > 0
    assert not torch.equal(dec, model.backbone.layer4[1].conv2.attn.decoder[2].bias)
    hook.detach()


def _cli():
    import importlib.util
    import os.path as osp
    path = osp.join(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), 'tools', 'model_converters',
                    'pedconv_to_mm.py')
    spec = importlib.util.spec_from_file_location('pedconv_to_mm', path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_official_checkpoint_format(golden, tmp_path):
    g = _official(golden)
    src = tmp_path / 'official.pth.tar'
    torch.save({'epoch': 250, 'arch': 'resnet18', 'best_prec1': torch.tensor(74.1),
                'state_dict': {'module.' + k: v for k, v in g['state_dict'].items()},
                'optimizer': {'state': {}, 'param_groups': [{'lr': 0.1, 'params': [0, 1]}]}}, src)
    cli = _cli()
    dst = tmp_path / 'mm.pth'
    assert cli.main([str(src), str(dst)]) == 0
    out = torch.load(dst, weights_only=True)['state_dict']
    assert 'head.fc.weight' in out and 'backbone.layer4.1.conv2.attn.fc_k.bias' in out
    m = PEDResNet(depth=18, widen_factor=0.25)
    assert cli.main([str(src), str(tmp_path / 'bb.pth'), '--target', 'dense_backbone']) == 0
    bb = torch.load(tmp_path / 'bb.pth', weights_only=True)['state_dict']
    assert sorted(bb) == sorted('backbone.' + k for k in m.state_dict())
    torch.save({'state_dict': {'module.conv2.weight': torch.zeros(1)}}, tmp_path / 'd.pth')
    assert cli.main([str(tmp_path / 'd.pth'), str(tmp_path / 'x.pth')]) == 2   # no PEDConv layer: refused
    assert not (tmp_path / 'x.pth').exists()


def _train_step_with_hook(model, data):
    from mmengine.optim import OptimWrapper
    model.init_weights()
    model.train()
    hook = AuxLossHook()
    n = hook.attach(model)
    assert n == 16
    optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.001))
    dec = model.backbone.layer4[1].conv2.attn.decoder[2].bias.detach().clone()
    log_vars = model.train_step(data, optim)
    hook.detach()
    assert log_vars['loss_aux_infomax'].item() > 0
    # the decoder only feeds the info-max loss: it moved, so the term was optimised
    assert not torch.equal(dec, model.backbone.layer4[1].conv2.attn.decoder[2].bias)
    return log_vars


def test_mmseg_encoder_decoder_trains_with_infomax():
    pytest.importorskip('mmseg', reason='mmseg is not installed')
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample

    import dynconv_mm  # noqa: F401
    model = MODELS.build(dict(
        type='EncoderDecoder', _scope_='mmseg',
        data_preprocessor=dict(type='SegDataPreProcessor', size=(64, 64)),
        backbone=dict(type='PEDResNet', depth=18, widen_factor=0.125, out_indices=(0, 1, 2, 3)),
        decode_head=dict(type='FCNHead', in_channels=64, in_index=3, channels=16, num_convs=1, num_classes=3,
                         norm_cfg=dict(type='BN'), loss_decode=dict(type='CrossEntropyLoss', loss_weight=1.0)),
        train_cfg=dict(), test_cfg=dict(mode='whole')))
    samples = []
    for i in range(2):
        s = SegDataSample()
        s.gt_sem_seg = PixelData(data=torch.randint(0, 3, (1, 64, 64)))
        s.set_metainfo(dict(img_shape=(64, 64), ori_shape=(64, 64), pad_shape=(64, 64)))
        samples.append(s)
    data = dict(inputs=[torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8) for _ in range(2)],
                data_samples=samples)
    log_vars = _train_step_with_hook(model, data)
    assert 'decode.loss_ce' in log_vars


def test_mmdet_mask_rcnn_trains_with_infomax():
    pytest.importorskip('mmdet', reason='mmdet is not installed')
    pytest.importorskip('mmcv.ops', reason='mmcv was built without its ops')
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.config import ConfigDict
    from mmengine.structures import InstanceData

    import dynconv_mm  # noqa: F401
    ch = 16
    model = MODELS.build(ConfigDict(
        type='MaskRCNN', _scope_='mmdet',
        data_preprocessor=dict(type='DetDataPreprocessor', pad_mask=True, pad_size_divisor=32),
        backbone=dict(type='PEDResNet', depth=18, widen_factor=0.125, out_indices=(0, 1, 2, 3)),
        neck=dict(type='FPN', in_channels=[8, 16, 32, 64], out_channels=ch, num_outs=5),
        rpn_head=dict(
            type='RPNHead', in_channels=ch, feat_channels=ch,
            anchor_generator=dict(type='AnchorGenerator', scales=[8], ratios=[0.5, 1.0, 2.0],
                                  strides=[4, 8, 16, 32, 64]),
            bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[.0] * 4, target_stds=[1.0] * 4),
            loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0),
            loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
        roi_head=dict(
            type='StandardRoIHead',
            bbox_roi_extractor=dict(type='SingleRoIExtractor', out_channels=ch, featmap_strides=[4, 8, 16, 32],
                                    roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=0)),
            bbox_head=dict(type='Shared2FCBBoxHead', in_channels=ch, fc_out_channels=32, roi_feat_size=7,
                           num_classes=2,
                           bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.] * 4,
                                           target_stds=[0.1, 0.1, 0.2, 0.2]),
                           reg_class_agnostic=False,
                           loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
                           loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
            mask_roi_extractor=dict(type='SingleRoIExtractor', out_channels=ch, featmap_strides=[4, 8, 16, 32],
                                    roi_layer=dict(type='RoIAlign', output_size=14, sampling_ratio=0)),
            mask_head=dict(type='FCNMaskHead', num_convs=1, in_channels=ch, conv_out_channels=ch, num_classes=2,
                           loss_mask=dict(type='CrossEntropyLoss', use_mask=True, loss_weight=1.0))),
        train_cfg=dict(
            rpn=dict(assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3,
                                   match_low_quality=True, ignore_iof_thr=-1),
                     sampler=dict(type='RandomSampler', num=64, pos_fraction=0.5, neg_pos_ub=-1,
                                  add_gt_as_proposals=False),
                     allowed_border=-1, pos_weight=-1, debug=False),
            rpn_proposal=dict(nms_pre=200, max_per_img=100, nms=dict(type='nms', iou_threshold=0.7), min_bbox_size=0),
            rcnn=dict(assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5,
                                    match_low_quality=True, ignore_iof_thr=-1),
                      sampler=dict(type='RandomSampler', num=32, pos_fraction=0.25, neg_pos_ub=-1,
                                   add_gt_as_proposals=True),
                      mask_size=28, pos_weight=-1, debug=False)),
        test_cfg=dict(
            rpn=dict(nms_pre=200, max_per_img=100, nms=dict(type='nms', iou_threshold=0.7), min_bbox_size=0),
            rcnn=dict(score_thr=0.05, nms=dict(type='nms', iou_threshold=0.5), max_per_img=10,
                      mask_thr_binary=0.5))))
    samples = []
    for i in range(2):
        s = DetDataSample()
        s.set_metainfo(dict(img_shape=(64, 64), ori_shape=(64, 64), pad_shape=(64, 64), scale_factor=(1.0, 1.0)))
        gt = InstanceData()
        gt.bboxes = torch.tensor([[8.0, 8.0, 40.0, 36.0], [20.0, 16.0, 60.0, 60.0]])
        gt.labels = torch.tensor([0, 1])
        masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
        masks[0, 8:36, 8:40] = 1
        masks[1, 16:60, 20:60] = 1
        gt.masks = BitmapMasks(masks.numpy(), 64, 64)
        s.gt_instances = gt
        samples.append(s)
    data = dict(inputs=[torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8) for _ in range(2)],
                data_samples=samples)
    log_vars = _train_step_with_hook(model, data)
    assert 'loss_mask' in log_vars and 'loss_rpn_cls' in log_vars


@pytest.mark.parametrize('depth,feat,total_m,decoder_m', [(18, 512, 12.14, 0.22), (50, 2048, 31.57, None)])
def test_full_size_parameter_counts_match_official(depth, feat, total_m, decoder_m):
    """Counts measured with the official code (OFFICIAL_NOTES): R18 12.14M, of which the info-max decoders
    0.22M; R50 31.57M (ImageNet heads). The exact count at width 0.25 is checked against the golden file."""
    with torch.device('meta'):  # shapes only: no memory, no init cost
        m = PEDResNet(depth=depth)
    n = sum(p.numel() for p in m.parameters()) + feat * 1000 + 1000
    assert round(n / 1e6, 2) == total_m
    if decoder_m is not None:
        dec = sum(p.numel() for k, p in m.named_parameters() if '.decoder.' in k)
        assert round(dec / 1e6, 2) == decoder_m
