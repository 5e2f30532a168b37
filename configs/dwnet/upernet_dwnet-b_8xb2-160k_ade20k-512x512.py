# UperNet with DWNet-B, ADE20K 512x512, 160k iterations: the official
# downstreams/segmentation/configs/dwnet/upernet_dwnet_base_patch4_window7_512x512_160k_ade20k.py: dense-mode DWNet
# (SyncBN, drop path 0.3), UperNet head (512 channels, pool scales 1/2/3/6) + FCN auxiliary head on stage 3
# (loss weight 0.4), AdamW lr 6e-5 wd 0.01, 1500 linear warm-up iterations, poly decay (power 1.0),
# 8 GPUs x 2 images, whole-image test.
#
# On one CPU/GPU process SyncBN must be BN: tools/train.py and tools/test.py switch automatically without a
# GPU; elsewhere call dynconv_mm.apis.replace_syncbn(cfg) (see docs/detection_segmentation.md).
#
# Backbone weights (ImageNet; the released segmentor converts with tools/model_converters/downstream_to_mm.py):
#   python tools/model_converters/dwnet_to_mm.py dwnet_base_224.pth \
#       checkpoints/dwnet-base_in1k_dense.pth --target dense_backbone --trusted
# Same recipe as upernet_dwnet-t_8xb2-160k_ade20k-512x512.py; only the backbone (and the head widths) differ.
_base_ = './upernet_dwnet-t_8xb2-160k_ade20k-512x512.py'

model = dict(
    backbone=dict(
        arch='base',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dwnet-base_in1k_dense.pth', prefix='backbone.')),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))
