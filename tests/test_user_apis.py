"""The OpenMMLab APIs users call first, on our configs and the checkpoints our training writes: mmdet's
``DetInferencer``, mmpretrain's ``ImageClassificationInferencer`` and mmseg's ``MMSegInferencer`` (class
names come from the checkpoint's ``meta.dataset_meta``), and the TensorBoard visualization backend."""
import glob
import json
import os.path as osp

import numpy as np
import pytest
import torch

pytest.importorskip('mmdet')
pytest.importorskip('mmseg')
pytest.importorskip('mmpretrain')

from conftest import make_toy_root, small_loaders  # noqa: E402

from dynconv_mm import quickstart as qs  # noqa: E402
from dynconv_mm.apis import load_config  # noqa: E402
from dynconv_mm.datasets.toy import ADE_CLASSES, CLS_CLASSES, THING_CLASSES  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = {scope: osp.join(ROOT, path) for scope, path in qs.QUICKSTART_CONFIGS.items()}
TINY = dict(coco=(4, 2), ade=(4, 2), imagenet=(2, 1))


@pytest.fixture(scope='module')
def toy_root(tmp_path_factory):
    return make_toy_root(str(tmp_path_factory.mktemp('toy')), TINY)


def _train(scope, toy_root, work_dir, iters=1, **cfg_fields):
    cfg = small_loaders(load_config(CONFIGS[scope]))
    qs.set_data_root(cfg, osp.join(toy_root, qs.DATASET_OF_SCOPE[scope]))
    qs.set_max_iters(cfg, iters)
    cfg.train_cfg.val_interval = 1000  # no validation
    cfg.merge_from_dict(cfg_fields)
    return qs.train(cfg, work_dir), cfg


@pytest.fixture(scope='module')
def checkpoints(toy_root, tmp_path_factory):
    """One training iteration of each quick-start config: the checkpoints the Runner writes."""
    work = tmp_path_factory.mktemp('work')
    paths = {scope: _train(scope, toy_root, str(work / scope))[0] for scope in CONFIGS}
    for path in paths.values():  # a mid-schedule temperature, unlike any constructor's value
        ckpt = torch.load(path, map_location='cpu', weights_only=False)
        for k, v in ckpt['state_dict'].items():
            if k.endswith('temperature'):
                v.fill_(MID_TEMPERATURE)
        torch.save(ckpt, path)
    return paths


MID_TEMPERATURE = 0.37


def _val_image(toy_root, name):
    return sorted(glob.glob(osp.join(toy_root, name, '**', '*.jpg'), recursive=True))[-1]


def test_checkpoints_carry_dataset_meta(checkpoints):
    expected = dict(mmdet=THING_CLASSES, mmseg=ADE_CLASSES, mmpretrain=CLS_CLASSES)
    for scope, path in checkpoints.items():
        meta = torch.load(path, map_location='cpu', weights_only=False)['meta']
        assert tuple(meta['dataset_meta']['classes']) == expected[scope], scope


def _assert_saved_temperatures(path, model, scope):
    """The model an inferencer built runs at the temperatures the checkpoint was saved at (set to a
    mid-schedule value), not at its constructor's values."""
    from dynconv_mm.apis import build_model
    saved = {k: v for k, v in torch.load(path, map_location='cpu', weights_only=False)['state_dict'].items()
             if k.endswith('temperature')}
    assert saved, f'{scope}: the quick-start model has temperature-bearing layers'
    fresh = build_model(CONFIGS[scope]).state_dict()
    assert all(float(fresh[k]) != MID_TEMPERATURE for k in saved), 'the constructor already gives that value'
    loaded = model.state_dict()
    for k, v in saved.items():
        assert torch.equal(loaded[k], v), k


def test_det_inferencer(checkpoints, toy_root, tmp_path):
    from mmdet.apis import DetInferencer, inference_detector

    inferencer = DetInferencer(model=CONFIGS['mmdet'], weights=checkpoints['mmdet'], device='cpu',
                               show_progress=False)
    assert tuple(inferencer.model.dataset_meta['classes']) == THING_CLASSES   # not mmdet's COCO default
    _assert_saved_temperatures(checkpoints['mmdet'], inferencer.model, 'mmdet')
    assert tuple(inferencer.visualizer.dataset_meta['classes']) == THING_CLASSES
    img = _val_image(toy_root, 'coco')
    out = inferencer(img, out_dir=str(tmp_path), no_save_pred=False, pred_score_thr=0.0)
    pred = out['predictions'][0]
    n = len(pred['labels'])
    assert n > 0 and len(pred['scores']) == len(pred['bboxes']) == len(pred['masks']) == n
    assert all(0 <= label < len(THING_CLASSES) for label in pred['labels'])
    # the inferencer's pipeline and model give what mmdet's plain inference gives
    direct = inference_detector(inferencer.model, img).pred_instances
    np.testing.assert_allclose(pred['scores'], direct.scores.numpy(), atol=1e-6)
    assert pred['labels'] == direct.labels.tolist()
    assert glob.glob(str(tmp_path / 'vis' / '*.jpg')) and glob.glob(str(tmp_path / 'preds' / '*.json'))


def test_image_classification_inferencer(checkpoints, toy_root):
    from mmpretrain import ImageClassificationInferencer

    inferencer = ImageClassificationInferencer(model=CONFIGS['mmpretrain'], pretrained=checkpoints['mmpretrain'],
                                               device='cpu')
    assert tuple(inferencer.classes) == CLS_CLASSES
    _assert_saved_temperatures(checkpoints['mmpretrain'], inferencer.model, 'mmpretrain')
    imgs = sorted(glob.glob(osp.join(toy_root, 'imagenet', 'val', '*', '*.jpg')))[:2]
    results = inferencer(imgs)
    for res in results:
        assert len(res['pred_scores']) == len(CLS_CLASSES)
        assert res['pred_scores'].sum() == pytest.approx(1.0, abs=1e-5)
        assert res['pred_label'] == int(np.argmax(res['pred_scores']))
        assert res['pred_class'] == CLS_CLASSES[res['pred_label']]


def test_mmseg_inferencer(checkpoints, toy_root, tmp_path):
    import mmcv
    from mmseg.apis import MMSegInferencer

    inferencer = MMSegInferencer(model=CONFIGS['mmseg'], weights=checkpoints['mmseg'], device='cpu')
    assert tuple(inferencer.model.dataset_meta['classes']) == ADE_CLASSES
    _assert_saved_temperatures(checkpoints['mmseg'], inferencer.model, 'mmseg')
    # mmseg 1.2's inferencer gives its visualizer Cityscapes' names unless told otherwise: the README's line
    inferencer.visualizer.set_dataset_meta(**inferencer.model.dataset_meta)
    assert tuple(inferencer.visualizer.dataset_meta['classes']) == ADE_CLASSES
    img = _val_image(toy_root, 'ade')
    out = inferencer(img, out_dir=str(tmp_path), return_vis=True)
    seg = np.asarray(out['predictions'])
    assert seg.shape == mmcv.imread(img).shape[:2]
    assert seg.min() >= 0 and seg.max() < len(ADE_CLASSES)
    assert np.asarray(out['visualization']).shape == mmcv.imread(img).shape
    assert glob.glob(str(tmp_path / 'vis' / '*'))


def test_tensorboard_backend_logs_the_scalars(toy_root, tmp_path):
    pytest.importorskip('tensorboard', reason='tensorboard is not installed (pip install tensorboard)')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # the README's one line: visualizer = dict(vis_backends=[dict(type='LocalVisBackend'),
    #                                                        dict(type='TensorboardVisBackend')])
    backends = [dict(type='LocalVisBackend'), dict(type='TensorboardVisBackend')]
    _train('mmdet', toy_root, str(tmp_path), iters=2, visualizer=dict(vis_backends=backends))
    events = glob.glob(str(tmp_path / '*' / 'vis_data' / 'events.out.tfevents.*'))
    assert len(events) == 1, events
    acc = EventAccumulator(events[0])
    acc.Reload()
    tags = set(acc.Tags()['scalars'])
    assert {'loss', 'lr', 'loss_rpn_cls', 'loss_mask', 'temperature'} <= tags, tags
    # the same numbers as the local backend's scalars.json
    with open(glob.glob(str(tmp_path / '*' / 'vis_data' / 'scalars.json'))[0]) as f:
        local = [r for r in map(json.loads, f) if 'loss' in r]  # training records
    assert [e.step for e in acc.Scalars('loss')] == [r['step'] for r in local] == [1, 2]
    np.testing.assert_allclose([e.value for e in acc.Scalars('loss')], [r['loss'] for r in local], rtol=1e-5)
