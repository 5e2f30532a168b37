# Cascade Mask R-CNN + FPN with DWNet-T, COCO 3x: the official DWNet detector
# (downstreams/detection/configs/dwnet/
# cascade_mask_rcnn_dwnet_tiny_patch4_window7_mstrain_480-800_giou_4conv1f_adamw_3x_coco.py):
# dense-mode DWNet (BatchNorm output norms, inputs padded to multiples of 7 inside the blocks), SyncBN in
# the backbone and the 4conv1fc box heads, GIoU x10, DETR-style multi-scale (480-800) + crop augmentation,
# AdamW lr 1e-4 wd 0.05, 36 epochs, steps [27, 33], drop path 0.2. The official runs used apex mixed
# precision (add --amp). Published: box AP 49.9, mask AP 43.4 (82M parameters).
#
# On one CPU/GPU process SyncBN must be BN: tools/train.py and tools/test.py switch automatically without a
# GPU; elsewhere call dynconv_mm.apis.replace_syncbn(cfg) (see docs/detection_segmentation.md).
#
# Backbone weights (ImageNet; the released detector converts with tools/model_converters/downstream_to_mm.py):
#   python tools/model_converters/dwnet_to_mm.py dwnet_tiny_224.pth \
#       checkpoints/dwnet-tiny_in1k_dense.pth --target dense_backbone --trusted
_base_ = '../_base_/det/cascade-mask-rcnn_fpn_4conv1fc-giou_adamw-ms-crop-3x_coco.py'
custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='DWNet',
        arch='tiny',
        mode='dense',
        dynamic=False,
        window_size=7,
        mlp_ratio=4.,
        drop_rate=0.,
        drop_path_rate=0.2,
        patch_norm=True,
        out_indices=(0, 1, 2, 3),
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dwnet-tiny_in1k_dense.pth', prefix='backbone.')),
    neck=dict(in_channels=[96, 192, 384, 768]))
