"""The ``Dynamized`` backbone wrapper and the balloon fine-tune configs of ``configs/dynamize``.

* the wrapper loads the static checkpoint *before* converting, so the dynamized backbone computes what
  the static one loaded with the same file computes, and a later ``init_weights()`` (mmengine's Runner
  calls it) changes nothing; a wrong ``init_cfg`` or a checkpoint of another network is refused;
* the fine-tune pipeline of ``docs/dynamize.md`` as users run it (``tools/train.py``, then
  ``tools/reparameterize.py`` and ``tools/test.py`` on the folded model) for two iterations on the real
  balloon photos, with a static checkpoint of random weights in place of the ImageNet one.
"""
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

pytest.importorskip('mmdet', reason='mmdet is not installed')
pytest.importorskip('mmcv.ops', reason='mmcv was built without its ops (RoIAlign, NMS)')
timm = pytest.importorskip('timm', reason='timm is not installed (pip install timm)')

from mmengine.config import Config  # noqa: E402

import dynconv_mm  # noqa: E402,F401
from dynconv_mm.backbones.dynamized import Dynamized  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIGS = {name: f'configs/dynamize/mask-rcnn_lite0-{name}_fpn_balloon.py'
           for name in ('static', 'scratch', 'dynamic-dw', 'dbb')}
TIMM = dict(type='mmpretrain.TIMMBackbone', model_name='tf_efficientnet_lite0', features_only=True,
            pretrained=False, out_indices=(1, 2, 3, 4))


@pytest.fixture(scope='module')
def static_checkpoint(tmp_path_factory):
    """A static Lite0 checkpoint (random weights, randomised BN statistics) in timm's key layout."""
    torch.manual_seed(0)
    model = timm.create_model('tf_efficientnet_lite0', pretrained=False)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    path = str(tmp_path_factory.mktemp('lite0') / 'lite0_timm.pth')
    torch.save(model.state_dict(), path)
    return path


def _static_features(path, x):
    from mmpretrain.registry import MODELS
    backbone = MODELS.build(dict(TIMM, type='TIMMBackbone'))
    sd = torch.load(path, map_location='cpu', weights_only=True)
    missing, unexpected = backbone.timm_model.load_state_dict(sd, strict=False)
    assert not missing, missing
    backbone.eval()  # mmpretrain's TIMMBackbone.train() returns None: no chaining
    with torch.no_grad():
        return backbone(x)


@pytest.mark.parametrize('rules', [None, dict(type='DynamicDWConv2d', kind='depthwise'),
                                   dict(type='DBB', kind=('kxk', 'depthwise')), 'ODConv2d'])
def test_dynamized_loads_the_static_weights_before_converting(static_checkpoint, rules):
    x = torch.randn(1, 3, 64, 64)
    expected = _static_features(static_checkpoint, x)
    model = Dynamized(TIMM, rules, init_cfg=dict(type='Pretrained', checkpoint=static_checkpoint)).eval()
    model.init_weights()  # the Runner calls it after building: it must not re-initialise anything
    with torch.no_grad():
        got = model(x)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    if rules is None:
        assert model.dynamize_report is None
    else:
        report = model.dynamize_report
        assert report.changes and report.exact and not report.lost


def test_dynamized_refuses_wrong_inputs(static_checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"init_cfg must be None or dict\(type='Pretrained'"):
        Dynamized(TIMM, None, init_cfg=dict(type='Kaiming'))
    other = tmp_path / 'resnet18.pth'
    torch.save(timm.create_model('resnet18', pretrained=False).state_dict(), other)
    with pytest.raises(Exception, match='(?i)missing|does not|no place|match'):
        Dynamized(TIMM, 'ODConv2d', init_cfg=dict(type='Pretrained', checkpoint=str(other)))


def test_the_configs_build_the_dynamized_detector():
    for name, rel in CONFIGS.items():
        cfg = Config.fromfile(osp.join(ROOT, rel))
        backbone = cfg.model.backbone
        assert backbone.type == 'Dynamized' and backbone.backbone.model_name == 'tf_efficientnet_lite0'
        assert (backbone.init_cfg is None) == (name == 'scratch')
        assert (backbone.rules is None) == (name in ('static', 'scratch'))
        assert cfg.train_dataloader.dataset.data_root.endswith('coco_real/')


def _run(args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''), CUDA_VISIBLE_DEVICES='')
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f'{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}'
    return proc.stdout + proc.stderr


def test_fine_tune_pipeline_two_iterations(static_checkpoint, tmp_path):
    """train (DBB from the static weights) -> reparameterize (folded, self-checked) -> test the plain model."""
    from conftest import shared_path
    data = shared_path('data', 'coco_real')
    work = str(tmp_path / 'work')
    short = ['train_cfg.max_iters=2', 'train_cfg.val_interval=2',
             f'model.backbone.init_cfg.checkpoint={static_checkpoint}',
             f'train_dataloader.dataset.data_root={data}/', f'val_dataloader.dataset.data_root={data}/',
             f'test_dataloader.dataset.data_root={data}/', 'val_dataloader.dataset.indices=2',
             'test_dataloader.dataset.indices=2', f'val_evaluator.ann_file={data}/annotations/instances_val.json',
             f'test_evaluator.ann_file={data}/annotations/instances_val.json', 'train_dataloader.num_workers=0',
             'train_dataloader.persistent_workers=False', 'val_dataloader.num_workers=0',
             'val_dataloader.persistent_workers=False', 'test_dataloader.num_workers=0',
             'test_dataloader.persistent_workers=False']
    log = _run([osp.join(ROOT, 'tools/train.py'), osp.join(ROOT, CONFIGS['dbb']), '--work-dir', work, '--device', 'cpu',
                '--cfg-options', *short], cwd=ROOT)
    assert 'Dynamized: ' in log and 'coco/bbox_mAP' in log
    ckpt = osp.join(work, 'iter_2.pth')
    assert osp.isfile(ckpt)
    deploy = str(tmp_path / 'deploy')
    log = _run([osp.join(ROOT, 'tools/reparameterize.py'), osp.join(ROOT, CONFIGS['dbb']), ckpt,
                osp.join(deploy, 'deploy.pth'), '--out-config', osp.join(deploy, 'deploy.py'),
                '--cfg-options', *short[2:]], cwd=ROOT)
    deploy_cfg = Config.fromfile(osp.join(deploy, 'deploy.py'))
    assert deploy_cfg.model.backbone.deploy is True
    log = _run([osp.join(ROOT, 'tools/test.py'), osp.join(deploy, 'deploy.py'), osp.join(deploy, 'deploy.pth'),
                '--work-dir', str(tmp_path / 'test'), '--device', 'cpu'], cwd=ROOT)
    assert 'coco/bbox_mAP' in log and 'coco/segm_mAP' in log
