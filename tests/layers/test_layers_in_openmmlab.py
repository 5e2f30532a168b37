"""Every dynamic layer through ``conv_cfg`` in stock OpenMMLab models, and through ONNX export.

* a stock mmpretrain ResNet-50 classifier and a stock mmdet Mask R-CNN R-50, with only ``conv_cfg``
  changed, build and run a training step on tiny inputs;
* a small model using each layer exports to ONNX with a dynamic batch axis, and onnxruntime
  reproduces PyTorch at batch sizes 1, 2 and 5 (which covers export at a fixed batch size too).
"""
import copy
import os.path as osp

import pytest
import torch
from mmcv.cnn import build_conv_layer
from mmengine.optim import OptimWrapper
from torch import nn

import dynconv_mm  # noqa: F401
from dynconv_mm.engine import AuxLossHook
from dynconv_mm.layers.kernel_warehouse import allocate_warehouses
from dynconv_mm.layers.torch_internals import onnx_export_kwargs

MASK_RCNN = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'data', 'configs',
                     'mmdet_maskrcnn_plugin_conv.py')

# conv_cfg of each dense dynamic layer (DynamicDWConv2d/IDynamicDWConv2d are depth-wise only: below)
DENSE_DYNAMIC = {
    'KWConv2d': dict(type='KWConv2d'),
    'PEDConv2d': dict(type='PEDConv2d'),
    'CondConv2d': dict(type='CondConv2d', num_experts=4),
    'DyConv2d': dict(type='DyConv2d', num_kernels=4),
    'ODConv2d': dict(type='ODConv2d', kernel_num=4),
}


def _count(model, name):
    return sum(type(m).__name__ == name for m in model.modules())


def _train_step(model, data, name, lr):
    # PEDConv's info-max loss reaches the optimizer through AuxLossHook (which a Runner attaches)
    hook = AuxLossHook()
    n_aux = hook.attach(model)
    assert (n_aux > 0) == (name == 'PEDConv2d')
    optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=lr))
    losses = model.train_step(data, optim)
    assert all(torch.isfinite(v) for k, v in losses.items() if 'loss' in k)
    assert ('loss_aux_infomax' in losses) == (name == 'PEDConv2d')
    return losses


@pytest.mark.parametrize('name', sorted(DENSE_DYNAMIC))
def test_stock_mmpretrain_resnet50_with_conv_cfg(name):
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    from mmpretrain.structures import DataSample
    init_default_scope('mmpretrain')
    cfg = dict(type='ImageClassifier',
               backbone=dict(type='ResNet', depth=50, conv_cfg=copy.deepcopy(DENSE_DYNAMIC[name])),
               neck=dict(type='GlobalAveragePooling'),
               head=dict(type='LinearClsHead', num_classes=3, in_channels=2048),
               data_preprocessor=dict(num_classes=3))
    model = MODELS.build(cfg)
    assert _count(model.backbone, name) == 53
    model.train()
    data = dict(inputs=[torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8) for _ in range(2)],
                data_samples=[DataSample().set_gt_label(i) for i in range(2)])
    _train_step(model, data, name, 0.01)


@pytest.mark.parametrize('name', sorted(DENSE_DYNAMIC))
def test_stock_mmdet_mask_rcnn_r50_with_conv_cfg(name):
    pytest.importorskip('mmdet', reason='mmdet is not installed')
    pytest.importorskip('mmcv.ops', reason='mmcv was built without its ops (RoIAlign, NMS)')
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.structures import InstanceData
    init_default_scope('mmdet')
    cfg = Config.fromfile(MASK_RCNN)  # the stock mmdet Mask R-CNN R-50 config
    cfg.model.backbone.conv_cfg = copy.deepcopy(DENSE_DYNAMIC[name])
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    assert _count(model.backbone, name) == 53
    model.train()
    h = w = 64
    sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
                                         batch_input_shape=(h, w), scale_factor=(1.0, 1.0)))
    masks = torch.zeros(1, h, w, dtype=torch.uint8)
    masks[0, 10:40, 12:50] = 1
    sample.gt_instances = InstanceData(bboxes=torch.tensor([[12., 10., 50., 40.]]), labels=torch.tensor([1]),
                                       masks=BitmapMasks(masks.numpy(), h, w))
    data = dict(inputs=[torch.randint(0, 255, (3, h, w), dtype=torch.uint8) for _ in range(2)],
                data_samples=[sample, copy.deepcopy(sample)])
    _train_step(model, data, name, 0.001)


class _Net(nn.Module):
    def __init__(self, conv_cfg, depthwise=False):
        super().__init__()
        c = 8
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        if depthwise:
            self.dyn1 = build_conv_layer(conv_cfg, c, c, 3, stride=1, padding=1, groups=c)
            self.dyn2 = build_conv_layer(conv_cfg, c, c, 3, stride=2, padding=1, groups=c)
        else:
            self.dyn1 = build_conv_layer(conv_cfg, c, 16, 3, stride=1, padding=1)
            self.dyn2 = build_conv_layer(conv_cfg, 16, c, 3, stride=2, padding=1, groups=2)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.dyn2(torch.relu(self.dyn1(torch.relu(self.stem(x)))))
        return self.head(x.mean((2, 3)))


EXPORT_CASES = dict(DENSE_DYNAMIC, DynamicDWConv2d=dict(type='DynamicDWConv2d'),
                    IDynamicDWConv2d=dict(type='IDynamicDWConv2d'))


@pytest.mark.parametrize('name', sorted(EXPORT_CASES))
def test_onnx_export_dynamic_batch(name, tmp_path):
    ort = pytest.importorskip('onnxruntime')
    pytest.importorskip('onnx')
    depthwise = name in ('DynamicDWConv2d', 'IDynamicDWConv2d')
    if name == 'IDynamicDWConv2d':
        # its kernels are generated per position; stride 2 is an extension, keep stride 1 here
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1),
                              build_conv_layer(EXPORT_CASES[name], 8, 8, 3, padding=1, groups=8))
    else:
        model = _Net(copy.deepcopy(EXPORT_CASES[name]), depthwise)
    allocate_warehouses(model)
    # non-trivial attention statistics
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 16, 16))
    model.eval()
    path = str(tmp_path / f'{name}.onnx')
    torch.onnx.export(model, (torch.randn(2, 3, 16, 16),), path, input_names=['x'], output_names=['y'],
                      dynamic_axes={'x': {0: 'batch'}, 'y': {0: 'batch'}}, opset_version=17, **onnx_export_kwargs())
    sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    for b in (1, 2, 5):
        x = torch.randn(b, 3, 16, 16)
        with torch.no_grad():
            ref = model(x)
        out = torch.from_numpy(sess.run(None, {'x': x.numpy()})[0])
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * max(1.0, ref.abs().max().item()))
