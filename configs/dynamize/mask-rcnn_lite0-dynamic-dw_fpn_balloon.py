# The pretrained EfficientNet-Lite0 made dynamic: every depth-wise convolution becomes DWNet's dynamic depth-wise
# convolution (DynamicDWConv2d), started from the pretrained kernel (the kernel generator outputs it for every
# input at first: the same function), then fine-tuned on the balloon photos (docs/dynamize.md).
_base_ = './mask-rcnn_lite0-static_fpn_balloon.py'
model = dict(backbone=dict(rules=dict(_delete_=True, type='DynamicDWConv2d', kind='depthwise')))
