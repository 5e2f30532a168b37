# Mask R-CNN + FPN with a KernelWarehouse (1x) ResNet-50, COCO 1x (official
# detection/configs/kernelwarehouse/resnet50/mask_rcnn_kw1x_resnet50_adamw_1x_coco.py): AdamW lr 1e-4,
# wd 0.05, DETR-style multi-scale + crop augmentation, 12 epochs, steps [8, 11]; all BatchNorms (also the
# attention BatchNorm1d) frozen (norm_eval), stem and layer1 frozen (the shared warehouses stay trainable
# while a trainable layer uses them). Published: box AP 41.8, mask AP 38.4.
#
# Temperature: every KW layer is built with temperature 0, the end value of the ImageNet schedule, and
# nothing changes it here (the official detection backbones call net_update_temperature(0)); so no
# TemperatureHook is used.
#
# Backbone weights: convert the official ImageNet checkpoint, then load its ``backbone.`` part:
#   python tools/model_converters/kernelwarehouse_to_mm.py kw1x_resnet50.pth \
#       checkpoints/kw1x-resnet50_in1k_converted.pth --trusted
# (classification config: configs/kernelwarehouse/kw1x-resnet50_8xb128-accum4_in1k.py)
_base_ = '../_base_/det/mask-rcnn_fpn_adamw-ms-crop-1x_coco.py'
custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='KWResNet',
        depth=50,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_eval=True,
        norm_cfg=dict(type='BN', requires_grad=True),
        drop_path_rate=0.1,
        reduction=0.0625,
        cell_num_ratio=1,
        cell_inplane_ratio=1,
        cell_outplane_ratio=1,
        sharing_range=('layer', 'conv'),
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/kw1x-resnet50_in1k_converted.pth',
                      prefix='backbone.')),
    neck=dict(in_channels=[256, 512, 1024, 2048]))
