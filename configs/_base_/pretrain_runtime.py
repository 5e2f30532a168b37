# mmpretrain runtime (hooks, logging, visualizer, environment) with the dynconv_mm plugin imported.
_base_ = ['mmpretrain::_base_/default_runtime.py']

custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)
default_scope = 'mmpretrain'
