# The control from random initialisation: the same Mask R-CNN + EfficientNet-Lite0 without the ImageNet
# weights (docs/dynamize.md).
_base_ = './mask-rcnn_lite0-static_fpn_balloon.py'
model = dict(backbone=dict(init_cfg=None))
