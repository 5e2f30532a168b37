# PEDConv ResNet-50. The official repository gives a training command for ResNet-18 only; the same
# recipe is used here (the paper reports 80.5% top-1 for ResNet-50, no checkpoint was released).
_base_ = './pedconv-resnet18_8xb64_in1k.py'

model = dict(backbone=dict(depth=50), head=dict(in_channels=2048))
