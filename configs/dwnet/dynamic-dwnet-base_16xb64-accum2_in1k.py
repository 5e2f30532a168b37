# Dynamic DWNet-B: official configs/dynamic_dwnet_base_patch4_window7_224.yaml (DYNAMIC: True, drop path
# 0.5) and scripts/run_dynamic_dwnet_base_patch4_window7_224.sh, same recipe as DWNet-B.
_base_ = './dwnet-base_16xb64-accum2_in1k.py'

model = dict(backbone=dict(dynamic=True))
