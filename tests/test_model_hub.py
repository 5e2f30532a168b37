"""mmpretrain's model hub knows our classification models: ``list_models`` lists them, ``get_model``
builds them from our configs, and ``pretrained=True`` says how to convert the official weights instead
of downloading anything (or, as mmpretrain would, silently returning random weights)."""
import subprocess
import sys

import pytest
import torch

pytest.importorskip('mmpretrain')
pytest.importorskip('modelindex')

import mmpretrain  # noqa: E402
from conftest import ROOT  # noqa: E402

import dynconv_mm  # noqa: E402, F401
from dynconv_mm.model_hub import ConvertedWeightsRequired, classification_models, registered_model_names  # noqa: E402
from dynconv_mm.utils.model_zoo import load_models  # noqa: E402

SMALL = 'kw1d4x-resnet18_3rdparty_8xb128-accum4_in1k'


def _classifiers():
    return {m['Name']: m for m in load_models(ROOT)
            if [r['Task'] for r in m.get('Results') or []] == ['Image Classification']}


def test_list_models_has_every_classifier_and_nothing_else():
    ours = _classifiers()
    assert len(ours) >= 20
    assert sorted(n.lower() for n in ours) == registered_model_names()
    listed = set(mmpretrain.list_models())
    assert set(registered_model_names()) <= listed
    assert not {m['Name'].lower() for m in load_models(ROOT)} - set(ours) & listed, 'detectors/segmentors listed'
    assert 'resnet18_8xb32_in1k' in listed  # mmpretrain's own models are still there
    assert set(mmpretrain.list_models('kw1x-resnet')) == {'kw1x-resnet18_3rdparty_8xb128-accum4_in1k',
                                                          'kw1x-resnet50_3rdparty_8xb128-accum4_in1k'}
    assert SMALL in mmpretrain.list_models('kw', task='Image Classification')


def test_a_metafile_mixing_tasks_is_refused(tmp_path):
    (tmp_path / 'model-index.yml').write_text('Import:\n  - mixed.yml\n')
    (tmp_path / 'mixed.yml').write_text(
        'Models:\n'
        '  - Name: a-classifier\n    Config: a.py\n'
        '    Results:\n      - {Task: Image Classification, Dataset: ImageNet-1k, Metrics: {Top 1 Accuracy: 1}}\n'
        '  - Name: a-detector\n    Config: b.py\n'
        '    Results:\n      - {Task: Object Detection, Dataset: COCO, Metrics: {box AP: 1}}\n')
    with pytest.raises(ValueError,
                       match=r"mixed.yml mixes image-classification models with others \(\[.a-detector.\]\)"):
        classification_models(str(tmp_path))


def test_get_model_builds_our_config_and_loads_a_checkpoint(tmp_path):
    model = mmpretrain.get_model(SMALL)
    assert type(model.backbone).__name__ == 'KWResNet'
    assert sum(p.numel() for p in model.parameters()) == _classifiers()[SMALL]['Metadata']['Parameters']
    # a converted checkpoint (any mmengine checkpoint of the config) loads by name, with its class names
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    classes = [f'class{i}' for i in range(1000)]
    ckpt = str(tmp_path / 'converted.pth')
    torch.save({'state_dict': model.state_dict(), 'meta': dict(dataset_meta=dict(classes=classes))}, ckpt)
    loaded = mmpretrain.get_model(SMALL, pretrained=ckpt)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    assert loaded._dataset_meta['classes'] == classes  # what mmpretrain's inferencers read


def test_pretrained_true_explains_the_conversion_and_downloads_nothing(monkeypatch):
    import mmengine.runner

    def no_download(*args, **kwargs):
        raise AssertionError('a checkpoint load was attempted')
    monkeypatch.setattr(mmengine.runner, 'load_checkpoint', no_download)
    for name, tool, link in [
            ('kw1x-resnet18_3rdparty_8xb128-accum4_in1k', 'tools/model_converters/kernelwarehouse_to_mm.py',
             'https://drive.google.com/file/d/1aLaO8QV9QYdfv5GE2tg9iDWLeEJfkrKY'),
            ('dynamic-dwnet-tiny_3rdparty_8xb128_in1k', 'tools/model_converters/dwnet_to_mm.py', 'https://')]:
        with pytest.raises(ConvertedWeightsRequired) as info:
            mmpretrain.get_model(name, pretrained=True)
        msg = str(info.value)
        assert tool in msg and link in msg and f"get_model('{name}', pretrained='CONVERTED.pth')" in msg
    with pytest.raises(ConvertedWeightsRequired, match='has no official checkpoint.*tools/train.py'):
        mmpretrain.get_model('pedconv-resnet50_8xb64_in1k', pretrained=True)
    # the inferencer asks for pretrained weights by default: the same explanation
    from mmpretrain import ImageClassificationInferencer
    with pytest.raises(ConvertedWeightsRequired, match='kernelwarehouse_to_mm.py'):
        ImageClassificationInferencer(SMALL)


def test_no_mmpretrain_no_hub(tmp_path):
    """Without mmpretrain, importing dynconv_mm neither fails nor tries to fill a hub."""
    blocker = tmp_path / 'block.py'
    blocker.write_text(
        'import sys\n'
        'class _Block:\n'
        '    def find_spec(self, name, path=None, target=None):\n'
        "        if name.split('.')[0] in ('mmpretrain', 'modelindex'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        'sys.meta_path.insert(0, _Block())\n')
    code = ('import runpy, sys; runpy.run_path(%r)\n'
            'import dynconv_mm\n'
            'from dynconv_mm.model_hub import register_model_hub, registered_model_names\n'
            "assert register_model_hub() == registered_model_names() == []\n"
            "assert 'mmpretrain' not in sys.modules\n"
            "print('ok')\n") % str(blocker)
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0 and 'ok' in out.stdout, out.stderr[-2000:]
