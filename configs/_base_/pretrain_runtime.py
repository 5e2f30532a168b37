# mmpretrain runtime (hooks, logging, visualizer, environment) with the dynconv_mm plugin imported.
_base_ = ['mmpretrain::_base_/default_runtime.py']

custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)
default_scope = 'mmpretrain'

# ImageNet training crops have one fixed size (224 px): cuDNN times its convolution algorithms once per
# shape and keeps the fastest (the dynamic layers' grouped form has one shape per batch size, and the
# last, smaller batch of an epoch adds one more). Detection and segmentation configs keep mmdet's and
# mmseg's False: their multi-scale inputs would be re-timed at every new size.
env_cfg = dict(cudnn_benchmark=True)
