# Mask R-CNN + FPN with a plain ConvNeXt-T, COCO 1x: the baseline of the KernelWarehouse detection table
# (official .../convnext_tiny/mask_rcnn_convnext_tiny_adamw_1x_coco.py): AdamW lr 1e-4, wd 0.05,
# layer-wise lr decay 0.95 over 6 layers (mmdet's LearningRateDecayOptimizerConstructor), drop path 0.4,
# layer scale 1.0, 12 epochs, steps [9, 11]. Published: box AP 43.4, mask AP 39.7.
#
# Backbone weights: an mmpretrain ConvNeXt-T ImageNet checkpoint (``backbone.`` keys); the official
# KernelWarehouse baseline (ConvNeXt repository layout) converts with the KW converter and --baseline:
#   python tools/model_converters/kernelwarehouse_to_mm.py convnext_tiny.pth \
#       checkpoints/convnext-tiny_in1k_kw-recipe.pth --arch convnext --key model_ema --baseline --trusted
_base_ = '../_base_/det/mask-rcnn_fpn_adamw-ms-crop-1x_coco.py'
custom_imports = dict(imports=['dynconv_mm', 'mmpretrain.models'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='mmpretrain.ConvNeXt',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.4,
        layer_scale_init_value=1.0,
        gap_before_final_norm=False,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/convnext-tiny_in1k_kw-recipe.pth',
                      prefix='backbone.')),
    neck=dict(in_channels=[96, 192, 384, 768]))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    constructor='LearningRateDecayOptimizerConstructor',
    paramwise_cfg=dict(decay_rate=0.95, decay_type='layer_wise', num_layers=6),
    optimizer=dict(type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[9, 11], gamma=0.1),
]
