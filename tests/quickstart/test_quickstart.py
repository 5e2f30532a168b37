"""The quick-start configs and dynconv_mm.quickstart: each config trains and tests for real through
mmengine's Runner on a tiny toy set; ``mim train`` resolves one; resuming gives the uninterrupted run."""
import json
import math
import os
import os.path as osp
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip('mmdet')
pytest.importorskip('mmseg')
pytest.importorskip('mmpretrain')

from conftest import cpu_subprocess_env, make_toy_root, small_loaders  # noqa: E402

from dynconv_mm import quickstart as qs  # noqa: E402
from dynconv_mm.apis import load_config  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIGS = {scope: osp.join(ROOT, path) for scope, path in qs.QUICKSTART_CONFIGS.items()}
# tiny toy sets: (train, val) scenes for coco/ade, images per class for imagenet
TINY = dict(coco=(8, 4), ade=(8, 4), imagenet=(4, 2))


@pytest.fixture(scope='module')
def toy_root(tmp_path_factory):
    return make_toy_root(str(tmp_path_factory.mktemp('toy')), TINY)


def _all_dicts(obj):
    if isinstance(obj, dict):
        yield obj
        for v in obj.values():
            yield from _all_dicts(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _all_dicts(v)


# ---------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize('scope', sorted(CONFIGS))
def test_config_conventions(scope):
    cfg = load_config(CONFIGS[scope])
    assert 'dynconv_mm' in cfg.custom_imports['imports']
    assert [h['type'] for h in cfg.custom_hooks].count('TemperatureHook') == 1
    hook = next(h for h in cfg.custom_hooks if h['type'] == 'TemperatureHook')
    assert 0 < hook['num_iters'] < cfg.train_cfg.max_iters, 'annealing must end inside the run'
    norms = {d['type'] for d in _all_dicts(cfg.model) if 'type' in d and 'BN' in str(d['type'])}
    assert norms == {'BN'}, norms
    name = qs.DATASET_OF_SCOPE[scope]
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        assert cfg[key].dataset.data_root == f'data/toy/{name}/'
        assert cfg[key].num_workers <= 2
    assert qs.detect_scope(cfg) == scope


def test_set_data_root_moves_datasets_and_evaluators():
    cfg = load_config(CONFIGS['mmdet'])
    qs.set_data_root(cfg, '/somewhere/coco')
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        assert cfg[key].dataset.data_root == '/somewhere/coco/'
    assert cfg.val_evaluator.ann_file == '/somewhere/coco/annotations/instances_val.json'
    assert cfg.test_evaluator.ann_file == '/somewhere/coco/annotations/instances_val.json'


def test_set_max_iters_rescales_schedules():
    cfg = load_config(CONFIGS['mmdet'])
    old, anneal = cfg.train_cfg.max_iters, cfg.custom_hooks[0]['num_iters']
    qs.set_max_iters(cfg, old // 2)
    assert cfg.train_cfg.max_iters == cfg.train_cfg.val_interval == old // 2
    assert cfg.default_hooks.checkpoint.interval == old // 2
    assert cfg.custom_hooks[0]['num_iters'] == round(anneal / 2)
    assert cfg.param_scheduler[-1]['end'] == old // 2
    assert cfg.param_scheduler[-1]['T_max'] == old // 2 - cfg.param_scheduler[-1]['begin']
    with pytest.raises(ValueError, match='iters'):
        qs.set_max_iters(cfg, 0)


# --------------------------------------------------------------------------------- train + test for real
def _check_temperature(ckpt_path, cfg):
    hook = next(h for h in cfg.custom_hooks if h['type'] == 'TemperatureHook')
    ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=False)
    t = cfg.train_cfg.max_iters
    expected = hook['end'] + max(0.0, (hook['start'] - hook['end']) * (hook['num_iters'] - t) / hook['num_iters'])
    assert ckpt['meta']['temperature'] == pytest.approx(expected)
    assert ckpt['meta']['iter'] == t


def test_mask_rcnn_quickstart_trains_tests_and_draws(toy_root, tmp_path, cpu_only):
    work = str(tmp_path / 'work')
    summary = qs.run_quickstart(CONFIGS['mmdet'], work_dir=work, iters=3, toy_root=toy_root,
                                cfg_options=dict(train_dataloader=dict(batch_size=2, num_workers=0,
                                                                       persistent_workers=False),
                                                 val_dataloader=dict(num_workers=0, persistent_workers=False),
                                                 test_dataloader=dict(num_workers=0, persistent_workers=False)))
    m = summary['metrics']
    for key in ('coco/bbox_mAP', 'coco/segm_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP_50'):
        assert key in m and (m[key] == -1 or 0 <= m[key] <= 1), m
    assert osp.isfile(summary['checkpoint'])
    # one picture per validation scene, drawn by mmdet's visualizer
    assert len(summary['pictures']) == TINY['coco'][1]
    assert all(p.startswith(summary['show_dir']) for p in summary['pictures'])
    with open(osp.join(work, 'quickstart_summary.json')) as f:
        assert json.load(f)['metrics'] == m
    cfg = qs.set_max_iters(load_config(CONFIGS['mmdet']), 3)
    _check_temperature(summary['checkpoint'], cfg)


def test_upernet_quickstart_trains_and_tests(toy_root, tmp_path, cpu_only):
    cfg = small_loaders(load_config(CONFIGS['mmseg']))
    qs.set_data_root(cfg, osp.join(toy_root, 'ade'))
    qs.set_max_iters(cfg, 3)
    ckpt = qs.train(cfg, str(tmp_path / 'work'))
    _check_temperature(ckpt, cfg)
    metrics = qs.test(cfg, ckpt, str(tmp_path / 'work'), show_dir=str(tmp_path / 'vis'))
    assert 0 <= metrics['mIoU'] <= 100 and 0 < metrics['aAcc'] <= 100, metrics
    assert len(qs.list_pictures(str(tmp_path / 'vis'))) == TINY['ade'][1]


def test_classifier_quickstart_via_mim(toy_root, tmp_path, cpu_only):
    mim = shutil.which('mim', path=osp.dirname(sys.executable))
    if mim is None:
        pytest.skip('openmim is not installed')
    cfg = small_loaders(load_config(CONFIGS['mmpretrain']), batch=4)
    qs.set_data_root(cfg, osp.join(toy_root, 'imagenet'))
    qs.set_max_iters(cfg, 4)
    path = str(tmp_path / 'cls_cfg.py')
    cfg.dump(path)
    work = str(tmp_path / 'work')
    env = cpu_subprocess_env(PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''),
                             PATH=osp.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', ''))
    proc = subprocess.run([mim, 'train', 'dynconv_mm', path, '--work-dir', work], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    ckpt = qs.last_checkpoint(work)
    assert ckpt.endswith('iter_4.pth'), ckpt
    _check_temperature(ckpt, load_config(path))
    metrics = qs.test(load_config(path), ckpt, work)
    assert 0 <= metrics['accuracy/top1'] <= 100


# ----------------------------------------------------------------------------------------------- resume
def test_resume_gives_the_uninterrupted_run(toy_root, tmp_path, cpu_only):
    """Stop at iteration 3 of 6 (its checkpoint), resume: same weights and temperature as straight through."""
    cfg = small_loaders(load_config(CONFIGS['mmpretrain']), batch=4)
    qs.set_data_root(cfg, osp.join(toy_root, 'imagenet'))
    qs.set_max_iters(cfg, 6)
    cfg.default_hooks.checkpoint.interval = 3
    cfg.default_hooks.checkpoint.max_keep_ckpts = 3
    cfg.train_cfg.val_interval = 100  # no validation: only training state matters
    hook = next(h for h in cfg.custom_hooks if h['type'] == 'TemperatureHook')
    hook.update(start=1.0, end=0.0, num_iters=9)  # still annealing at the end
    straight = str(tmp_path / 'straight')
    qs.train(cfg, straight)
    resumed = str(tmp_path / 'resumed')
    qs.train(cfg, resumed, resume=osp.join(straight, 'iter_3.pth'))

    a = torch.load(osp.join(straight, 'iter_6.pth'), map_location='cpu', weights_only=False)
    b = torch.load(osp.join(resumed, 'iter_6.pth'), map_location='cpu', weights_only=False)
    mid = torch.load(osp.join(straight, 'iter_3.pth'), map_location='cpu', weights_only=False)
    assert b['meta']['iter'] == a['meta']['iter'] == 6
    assert mid['meta']['temperature'] == pytest.approx(1 - 3 / 9)
    assert a['meta']['temperature'] == pytest.approx(1 - 6 / 9)
    assert b['meta']['temperature'] == a['meta']['temperature']
    assert a['state_dict'].keys() == b['state_dict'].keys()
    moved = 0
    for k, v in a['state_dict'].items():
        torch.testing.assert_close(b['state_dict'][k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f'{k}: {m}')
        if v.is_floating_point() and not torch.equal(v, mid['state_dict'][k]):
            moved += 1
    assert moved > len(a['state_dict']) // 2, 'the last 3 iterations must change the weights'
    assert not math.isnan(a['meta']['temperature'])
