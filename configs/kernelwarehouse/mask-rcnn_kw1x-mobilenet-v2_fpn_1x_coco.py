# Mask R-CNN + FPN with a KernelWarehouse (1x) MobileNetV2 (1.0), COCO 1x (official
# .../mobilenetv2/mask_rcnn_kw1x_mobilenetv2_100_adamw_1x_coco.py): warehouses shared per
# ('layer', 'pwconv'); FPN on layer2, layer3, layer5, conv2 (official feature indices 3, 6, 13, 18);
# official frozen_stages=1 (features.0..3) = frozen_stages=2 here; all BatchNorms frozen. KW layers keep
# temperature 0 (their construction value; no TemperatureHook). Published: box AP 36.4, mask AP 33.7.
#
# Backbone weights:
#   python tools/model_converters/kernelwarehouse_to_mm.py kw1x_mobilenetv2_100.pth \
#       checkpoints/kw1x-mobilenet-v2_in1k_converted.pth --trusted
# (classification config: configs/kernelwarehouse/kw1x-mobilenet-v2_8xb32_in1k.py)
_base_ = '../_base_/det/mask-rcnn_fpn_adamw-ms-crop-1x_coco.py'
custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='KWMobileNetV2',
        widen_factor=1.0,
        variant='kw',
        out_indices=(1, 2, 4, 7),
        frozen_stages=2,
        norm_eval=True,
        norm_cfg=dict(type='BN', requires_grad=True),
        reduction=0.0625,
        cell_num_ratio=1,
        cell_inplane_ratio=1,
        cell_outplane_ratio=1,
        sharing_range=('layer', 'pwconv'),
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/kw1x-mobilenet-v2_in1k_converted.pth',
                      prefix='backbone.')),
    neck=dict(in_channels=[24, 32, 96, 1280]))
