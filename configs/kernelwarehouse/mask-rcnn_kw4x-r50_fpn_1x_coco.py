# Mask R-CNN + FPN with a KernelWarehouse (4x) ResNet-50, COCO 1x (official
# .../resnet50/mask_rcnn_kw4x_resnet50_adamw_1x_coco.py); same recipe as the 1x model, 4x as many
# warehouse cells. Published: box AP 42.4, mask AP 38.9.
#
# Backbone weights:
#   python tools/model_converters/kernelwarehouse_to_mm.py kw4x_resnet50.pth \
#       checkpoints/kw4x-resnet50_in1k_converted.pth --trusted
# (classification config: configs/kernelwarehouse/kw4x-resnet50_8xb128-accum4_in1k.py)
_base_ = './mask-rcnn_kw1x-r50_fpn_1x_coco.py'
custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        cell_num_ratio=4,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/kw4x-resnet50_in1k_converted.pth',
                      prefix='backbone.')))
