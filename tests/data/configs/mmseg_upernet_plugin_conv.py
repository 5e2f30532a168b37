# A stock mmseg UperNet R-50 whose backbone convs come from dynconv_mm through conv_cfg (BN, not SyncBN).
_base_ = ['mmseg::_base_/models/upernet_r50.py']
custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)
default_scope = 'mmseg'
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    pretrained=None,
    data_preprocessor=dict(size=(64, 64)),
    backbone=dict(conv_cfg=dict(type='DOConv2d'), norm_cfg=norm_cfg),
    decode_head=dict(norm_cfg=norm_cfg, num_classes=4),
    auxiliary_head=dict(norm_cfg=norm_cfg, num_classes=4))
