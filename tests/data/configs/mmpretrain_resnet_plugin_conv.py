# A stock mmpretrain ResNet-18 classifier whose convs come from dynconv_mm through conv_cfg.
_base_ = ['mmpretrain::_base_/models/resnet18.py']
custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)
default_scope = 'mmpretrain'
model = dict(backbone=dict(conv_cfg=dict(type='DOConv2d')))
