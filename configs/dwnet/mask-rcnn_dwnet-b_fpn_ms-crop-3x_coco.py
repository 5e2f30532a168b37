# Mask R-CNN + FPN with DWNet-B, COCO 3x. There is no official DWNet Mask R-CNN: this config uses
# the DWNet detection recipe (dense-mode DWNet with SyncBN, DETR-style multi-scale + crop augmentation,
# AdamW lr 1e-4 wd 0.05, 36 epochs, steps [27, 33], drop path 0.3) with mmdet's standard Mask R-CNN
# heads, and loads only the converted ImageNet backbone. No published result.
#
# Backbone weights:
#   python tools/model_converters/dwnet_to_mm.py dwnet_base_224.pth \
#       checkpoints/dwnet-base_in1k_dense.pth --target dense_backbone --trusted
# Same recipe as mask-rcnn_dwnet-t_fpn_ms-crop-3x_coco.py; only the backbone (and the neck widths) differ.
_base_ = './mask-rcnn_dwnet-t_fpn_ms-crop-3x_coco.py'

model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dwnet-base_in1k_dense.pth', prefix='backbone.')),
    neck=dict(in_channels=[128, 256, 512, 1024]))
