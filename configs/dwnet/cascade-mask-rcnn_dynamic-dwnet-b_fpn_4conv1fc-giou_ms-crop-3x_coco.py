# Cascade Mask R-CNN + FPN with dynamic DWNet-B, COCO 3x: the official
# cascade_mask_rcnn_dynamic_dwnet_base_..._adamw_3x_coco.py (drop path 0.3).
# Published: box AP 51.2, mask AP 44.4 (219M parameters).
#
# Backbone weights:
#   python tools/model_converters/dwnet_to_mm.py dynamic_dwnet_base_224.pth \
#       checkpoints/dynamic-dwnet-base_in1k_dense.pth --target dense_backbone --trusted
_base_ = './cascade-mask-rcnn_dwnet-b_fpn_4conv1fc-giou_ms-crop-3x_coco.py'
custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        dynamic=True,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dynamic-dwnet-base_in1k_dense.pth',
                      prefix='backbone.')))
