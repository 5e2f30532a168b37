# Mask R-CNN + FPN with a KernelWarehouse (4x) MobileNetV2 (1.0), COCO 1x (official
# .../mobilenetv2/mask_rcnn_kw4x_mobilenetv2_100_adamw_1x_coco.py): 4x cells, warehouses shared per
# 'layer' only (the official config passes the string ('layer'), which groups the same way).
# Published: box AP 38.0, mask AP 34.9.
#
# Backbone weights:
#   python tools/model_converters/kernelwarehouse_to_mm.py kw4x_mobilenetv2_100.pth \
#       checkpoints/kw4x-mobilenet-v2_in1k_converted.pth --trusted
# (classification config: configs/kernelwarehouse/kw4x-mobilenet-v2_8xb32_in1k.py)
_base_ = './mask-rcnn_kw1x-mobilenet-v2_fpn_1x_coco.py'
custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        cell_num_ratio=4,
        sharing_range=('layer', ),
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/kw4x-mobilenet-v2_in1k_converted.pth',
                      prefix='backbone.')))
