# KernelWarehouse ResNet-18 (4x): official configs/resnet18/kw4x_resnet18.json.
_base_ = './kw1x-resnet18_8xb128-accum4_in1k.py'

model = dict(backbone=dict(cell_num_ratio=4))
