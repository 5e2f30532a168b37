# Cascade Mask R-CNN + FPN with dynamic DWNet-T (per-sample depth-wise kernels), COCO 3x: the official
# cascade_mask_rcnn_dynamic_dwnet_tiny_..._adamw_3x_coco.py; recipe as for DWNet-T.
# Published: box AP 50.5, mask AP 43.7 (108M parameters).
#
# Backbone weights:
#   python tools/model_converters/dwnet_to_mm.py dynamic_dwnet_tiny_224.pth \
#       checkpoints/dynamic-dwnet-tiny_in1k_dense.pth --target dense_backbone --trusted
_base_ = './cascade-mask-rcnn_dwnet-t_fpn_4conv1fc-giou_ms-crop-3x_coco.py'
custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        dynamic=True,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dynamic-dwnet-tiny_in1k_dense.pth',
                      prefix='backbone.')))
