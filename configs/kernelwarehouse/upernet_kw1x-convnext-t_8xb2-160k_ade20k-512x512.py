# UperNet with a KernelWarehouse (1x) ConvNeXt-T, ADE20K 512x512, 160k iterations. KernelWarehouse has no
# official segmentation config: this follows mmseg's ConvNeXt-T UperNet recipe
# (convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py): drop path 0.4, layer scale 1.0, AdamW lr 1e-4,
# wd 0.05, stage-wise lr decay 0.9 over 6 layers (warehouses in the last group, lr scale 1.0), 1500 linear
# warm-up iterations then poly decay, 8 GPUs x 2 images, sliding-window test (512, stride 341); SyncBN in
# the heads. KW layers keep temperature 0 (no TemperatureHook). No published result. mmseg trains this
# recipe with AMP (add --amp).
#
# Backbone weights:
#   python tools/model_converters/kernelwarehouse_to_mm.py kw1x_convnext_tiny.pth \
#       checkpoints/kw1x-convnext-tiny_in1k_converted.pth --key model_ema --trusted
_base_ = '../_base_/seg/upernet_adamw-160k_ade20k-512x512.py'
custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)

crop_size = (512, 512)
model = dict(
    backbone=dict(
        _delete_=True,
        type='KWConvNeXt',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.4,
        layer_scale_init_value=1.0,
        gap_before_final_norm=False,
        reduction=0.0625,
        cell_num_ratio=1,
        cell_inplane_ratio=1,
        cell_outplane_ratio=1,
        sharing_range=('layer', 'pwconv'),
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/kw1x-convnext-tiny_in1k_converted.pth',
                      prefix='backbone.')),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(341, 341)))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    constructor='LearningRateDecayOptimizerConstructor',
    paramwise_cfg=dict(decay_rate=0.9, decay_type='stage_wise', num_layers=6),
    optimizer=dict(type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05))
