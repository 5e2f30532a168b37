# KernelWarehouse ConvNeXt-T (1x): official configs/convnext/kw1x_convnext_tiny.json and main.py defaults
# (every convolution a KW layer, warehouses shared per ('layer', 'pwconv'), drop path 0.3, EMA 0.9999).
# Total batch 4096 = 8 GPUs x 128 x 4 accumulation steps.
_base_ = [
    'mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py',
    '../_base_/schedules/imagenet_bs4096_adamw_kw.py',
    '../_base_/pretrain_runtime.py',
]

custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)
default_scope = 'mmpretrain'

model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='KWConvNeXt',
        arch='tiny',
        reduction=0.0625,
        cell_num_ratio=1,
        cell_inplane_ratio=1,
        cell_outplane_ratio=1,
        sharing_range=('layer', 'pwconv'),
        drop_path_rate=0.3,
        layer_scale_init_value=1e-6,
        gap_before_final_norm=True),  # official head: global average pooling -> LayerNorm -> Linear
    head=dict(
        type='LinearClsHead',
        num_classes=1000,
        in_channels=768,
        loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original'),
        topk=(1, 5),
        init_cfg=dict(type='TruncNormal', layer='Linear', std=.02, bias=0.)),
    train_cfg=dict(augments=[dict(type='Mixup', alpha=0.8), dict(type='CutMix', alpha=1.0)]),
)

train_dataloader = dict(batch_size=128)
optim_wrapper = dict(accumulative_counts=4)

custom_hooks = [
    dict(type='TemperatureHook', preset='kernelwarehouse'),
    # timm ModelEma(decay=0.9999) updated once per optimizer step (every 4 iterations here)
    dict(type='EMAHook', momentum=1e-4, interval=4, priority='ABOVE_NORMAL'),
]
