# OREPA ResNet-50: same recipe as ResNet-18 (official train.py defaults, 4 GPUs x 64); Bottleneck 1x1
# convolutions and shortcuts are OREPA_1x1 blocks.
_base_ = './orepa-resnet18_4xb64_in1k.py'

model = dict(backbone=dict(depth=50), head=dict(in_channels=2048))
