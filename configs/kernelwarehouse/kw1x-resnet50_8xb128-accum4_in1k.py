# KernelWarehouse ResNet-50 (1x): official configs/resnet50/kw1x_resnet50.json and main.py defaults
# (total batch 4096 = 8 GPUs x 128 x 4 accumulation steps).
_base_ = './kw1x-resnet18_8xb128-accum4_in1k.py'

model = dict(backbone=dict(depth=50, drop_path_rate=0.1), head=dict(in_channels=2048))
