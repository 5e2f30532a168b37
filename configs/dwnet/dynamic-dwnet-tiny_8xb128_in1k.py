# Dynamic DWNet-T: official configs/dynamic_dwnet_tiny_patch4_window7_224.yaml (DYNAMIC: True, drop path
# 0.2), same recipe as DWNet-T.
_base_ = './dwnet-tiny_8xb128_in1k.py'

model = dict(backbone=dict(dynamic=True))
