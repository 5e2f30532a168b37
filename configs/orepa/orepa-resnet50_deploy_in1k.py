# OREPA ResNet-50 in its inference form (every block one Conv2d with bias).
_base_ = './orepa-resnet50_4xb64_in1k.py'

model = dict(backbone=dict(deploy=True))
