# KernelWarehouse ResNet-18 (1/4x): official configs/resnet18/kw1d4x_resnet18.json
# (half-size kernel cells, a quarter of the cells, no drop path, and no mixup/cutmix).
_base_ = './kw1x-resnet18_8xb128-accum4_in1k.py'

model = dict(
    backbone=dict(cell_num_ratio=0.25, cell_inplane_ratio=0.5, cell_outplane_ratio=0.5, drop_path_rate=0.0),
    train_cfg=None)  # mixup 0 / cutmix 0: label smoothing 0.1 only
