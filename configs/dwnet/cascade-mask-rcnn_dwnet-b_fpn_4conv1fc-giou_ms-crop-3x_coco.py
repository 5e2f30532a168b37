# Cascade Mask R-CNN + FPN with DWNet-B, COCO 3x: the official
# cascade_mask_rcnn_dwnet_base_..._adamw_3x_coco.py (embed dims 128, depths 2-2-18-2, drop path 0.3).
# Published: box AP 51.0, mask AP 44.1 (132M parameters).
#
# Backbone weights:
#   python tools/model_converters/dwnet_to_mm.py dwnet_base_224.pth \
#       checkpoints/dwnet-base_in1k_dense.pth --target dense_backbone --trusted
_base_ = './cascade-mask-rcnn_dwnet-t_fpn_4conv1fc-giou_ms-crop-3x_coco.py'
custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dwnet-base_in1k_dense.pth', prefix='backbone.')),
    neck=dict(in_channels=[128, 256, 512, 1024]))
