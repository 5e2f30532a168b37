"""The quick-start configs on small REAL datasets (../shared/data; skipped, saying why, where absent):
a few training iterations, then the real evaluators (COCO bbox/segm on real balloon photographs, mIoU on
real ADE20K pairs, top-1 on real ImageNet photographs)."""
import os.path as osp

import pytest

pytest.importorskip('mmdet')
pytest.importorskip('mmseg')
pytest.importorskip('mmpretrain')

from conftest import shared_path, small_loaders  # noqa: E402

from dynconv_mm import quickstart as qs  # noqa: E402
from dynconv_mm.apis import load_config  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIGS = {scope: osp.join(ROOT, path) for scope, path in qs.QUICKSTART_CONFIGS.items()}


def _set_metainfo(cfg, metainfo):
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[key].dataset.metainfo = metainfo


def test_mask_rcnn_on_real_coco_photos(tmp_path, cpu_only):
    root = shared_path('data', 'coco_real')
    cfg = small_loaders(load_config(CONFIGS['mmdet']))
    qs.set_data_root(cfg, root)
    _set_metainfo(cfg, dict(classes=('balloon',), palette=[(220, 20, 60)]))
    cfg.model.roi_head.bbox_head.num_classes = 1
    cfg.model.roi_head.mask_head.num_classes = 1
    qs.set_max_iters(cfg, 2)
    work = str(tmp_path / 'work')
    ckpt = qs.train(cfg, work)
    metrics = qs.test(cfg, ckpt, work)
    assert cfg.val_evaluator.ann_file == osp.join(root, 'annotations/instances_val.json')
    for key in ('coco/bbox_mAP', 'coco/segm_mAP'):
        assert key in metrics and (metrics[key] == -1 or 0 <= metrics[key] <= 1), metrics


def test_upernet_on_real_ade20k_pairs(tmp_path, cpu_only):
    root = shared_path('data', 'ade_real')
    cfg = small_loaders(load_config(CONFIGS['mmseg']))
    qs.set_data_root(cfg, root)
    # the real ADE20K-150 label space: mmseg's ADE20KDataset (its class list, reduce_zero_label)
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        ds = cfg[key].dataset
        ds.type = 'ADE20KDataset'
        ds.pop('metainfo', None)
    cfg.model.decode_head.num_classes = 150
    cfg.model.auxiliary_head.num_classes = 150
    qs.set_max_iters(cfg, 2)
    work = str(tmp_path / 'work')
    ckpt = qs.train(cfg, work)
    metrics = qs.test(cfg, ckpt, work)
    assert 0 <= metrics['mIoU'] <= 100 and 0 <= metrics['aAcc'] <= 100, metrics


def test_classifier_evaluates_real_imagenet_photos(tmp_path, cpu_only):
    root = shared_path('data', 'imagenet_real')
    cfg = small_loaders(load_config(CONFIGS['mmpretrain']), batch=25)
    for key in ('val_dataloader', 'test_dataloader'):
        ds = cfg[key].dataset
        ds.data_root, ds.ann_file, ds.data_prefix = root, 'meta/val.txt', 'val'
        ds.metainfo = dict(classes=[line.strip() for line in open(osp.join(root, 'meta', 'classes.txt'))])
    cfg.model.head.num_classes = 1000
    cfg.test_evaluator = dict(type='Accuracy', topk=(1, 5))
    from dynconv_mm.apis import build_runner
    runner = build_runner(cfg, work_dir=str(tmp_path / 'work'))
    assert len(runner.test_dataloader.dataset) == 50
    metrics = runner.test()
    # an untrained 1000-way classifier: the real pipeline and evaluator run; accuracy is near chance
    assert 0 <= metrics['accuracy/top1'] <= metrics['accuracy/top5'] <= 100, metrics
