"""Library side of the tools: scope detection, SyncBN switch, registry-error hints."""
import pytest
from mmengine.config import Config

from dynconv_mm.apis import (
    PLUGIN_IMPORT_HINT,
    detect_scope,
    ensure_custom_imports,
    explain_registry_error,
    replace_syncbn,
)


def test_detect_scope():
    assert detect_scope(Config(dict(default_scope='mmseg'))) == 'mmseg'
    assert detect_scope(Config(dict(model=dict(type='ImageClassifier')))) == 'mmpretrain'
    assert detect_scope(Config(dict(model=dict(type='EncoderDecoder')))) == 'mmseg'
    assert detect_scope(Config(dict(model=dict(type='MaskRCNN')))) == 'mmdet'
    with pytest.raises(ValueError, match='default_scope'):
        detect_scope(Config(dict()))


def test_replace_syncbn_and_custom_imports():
    cfg = Config(dict(model=dict(backbone=dict(norm_cfg=dict(type='SyncBN')),
                                 heads=[dict(norm_cfg=dict(type='SyncBN', requires_grad=True)), dict(norm_cfg=None)])))
    assert replace_syncbn(cfg) == 2
    assert cfg.model.backbone.norm_cfg.type == 'BN' and cfg.model.heads[0].norm_cfg.type == 'BN'
    ensure_custom_imports(cfg)
    ensure_custom_imports(cfg)
    assert cfg.custom_imports['imports'] == ['dynconv_mm']


def test_registry_error_hint_names_the_import():
    err = KeyError('KWResNet is not in the mmdet::model registry. Please check whether the value of '
                   '`KWResNet` is correct or it was registered as expected.')
    hint = explain_registry_error(err)
    assert hint is not None and PLUGIN_IMPORT_HINT in hint and 'KWResNet' in hint
    assert explain_registry_error(KeyError('ResNeXtFoo is not in the mmdet::model registry')) is None
    assert explain_registry_error(ValueError('something else')) is None
