"""The toy datasets: masks and encodings, scenes, written files, determinism, and the OpenMMLab
dataset classes and metrics that read them."""
import importlib.util
import json
import os
import os.path as osp

import cv2
import numpy as np
import pytest

from dynconv_mm.datasets import toy

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
SIZES = dict(coco=(6, 3), ade=(4, 2), imagenet=(2, 1))


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _need(module: str):
    if not _have(module):
        pytest.skip(f'{module} is not installed (it comes with the optional task libraries)')


def _make(root, seed=0, **kw):
    status = {}
    for name, (n_train, n_val) in SIZES.items():
        status.update(toy.make_toy_datasets(str(root), seed=seed, only=[name], num_train=n_train, num_val=n_val,
                                            log=lambda s: None, **kw))
    return status


@pytest.fixture(scope='module')
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('toy')
    _make(root)
    return root


def _scenes(n=12, crowd_prob=0.5, seed=0):
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        out.append(toy.render_scene(rng, 128 + 4 * i, 160 - 2 * i, crowd_prob=crowd_prob))
    return out


# ------------------------------------------------------------------------------------------ encodings
def _rle_cases():
    rng = np.random.default_rng(0)
    yield np.zeros((5, 7), bool)
    yield np.ones((5, 7), bool)
    m = np.zeros((6, 4), bool)
    m[0, 0] = True  # first pixel set: counts start with 0
    yield m
    m = np.zeros((6, 4), bool)
    m[-1, -1] = True
    yield m
    for _ in range(5):
        yield rng.random((int(rng.integers(1, 30)), int(rng.integers(1, 30)))) < rng.uniform(0.1, 0.9)


@pytest.mark.parametrize('mask', list(_rle_cases()))
def test_rle_round_trip(mask):
    rle = toy.mask_to_rle(mask)
    assert rle['size'] == list(mask.shape)
    assert sum(rle['counts']) == mask.size
    assert all(c > 0 for c in rle['counts'][1:])
    np.testing.assert_array_equal(toy.rle_to_mask(rle), mask)


def test_rle_is_column_major_like_coco():
    m = np.zeros((3, 2), bool)
    m[:, 1] = True  # the whole second column: one run after three background pixels
    m[0, 0] = True
    assert toy.mask_to_rle(m)['counts'] == [0, 1, 2, 3]
    if _have('pycocotools'):
        from pycocotools import mask as mask_utils
        rng = np.random.default_rng(1)
        for _ in range(5):
            m = rng.random((13, 17)) < 0.4
            rle = toy.mask_to_rle(m)
            decoded = mask_utils.decode(mask_utils.frPyObjects(rle, 13, 17))
            np.testing.assert_array_equal(decoded.astype(bool), m)
            assert mask_utils.area(mask_utils.frPyObjects(rle, 13, 17)) == m.sum()


def test_rle_rejects_bad_input():
    with pytest.raises(ValueError, match='mask_to_rle'):
        toy.mask_to_rle(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match='rle_to_mask'):
        toy.rle_to_mask({'counts': [1, 2], 'size': [2, 2]})


def test_exact_polygons_enclose_exactly_the_pixels():
    rng = np.random.default_rng(2)
    for _ in range(10):
        blob = cv2.GaussianBlur(rng.random((40, 50)).astype(np.float32), (0, 0), 3)
        mask = blob > np.quantile(blob, 0.6)
        mask[cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((3, 3))) > 0] = True
        polys = toy.mask_to_polygons(mask, epsilon=0)
        holes = toy._has_hole(mask)
        if not holes:
            assert sum(toy.polygon_area(p) for p in polys) == mask.sum()
        if _have('pycocotools') and not holes:
            from pycocotools import mask as mask_utils
            dec = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, 40, 50))).astype(bool)
            np.testing.assert_array_equal(dec, mask)


def test_polygons_split_diagonal_touches_and_skip_holes():
    pinch = np.zeros((4, 4), bool)
    pinch[1, 1] = pinch[2, 2] = True  # touching only at a corner: two parts
    polys = toy.mask_to_polygons(pinch, epsilon=0)
    assert sorted(polys) == [[1.0, 1.0, 2.0, 1.0, 2.0, 2.0, 1.0, 2.0], [2.0, 2.0, 3.0, 2.0, 3.0, 3.0, 2.0, 3.0]]
    ring = np.zeros((7, 7), bool)
    ring[1:6, 1:6] = True
    ring[3, 3] = False
    (outer,) = toy.mask_to_polygons(ring, epsilon=0)
    assert toy.polygon_area(outer) == 25  # the hole's loop is dropped, the outer one kept
    loops = toy._trace_loops(ring)
    assert sorted(toy._signed_area(p) for p in loops) == [-1.0, 25.0]


# ------------------------------------------------------------------------------------------ scenes
def test_scene_masks_reflect_occlusion():
    occluded = 0
    for scene in _scenes():
        h, w = scene.semantic.shape
        assert scene.image.shape == (h, w, 3) and scene.image.dtype == np.uint8
        assert len(scene.instances) >= 2
        union_vis = np.zeros((h, w), int)
        for k, inst in enumerate(scene.instances):
            assert not (inst.visible & ~inst.full).any()
            later = np.zeros((h, w), bool)
            for other in scene.instances[k + 1:]:
                later |= other.full
            np.testing.assert_array_equal(inst.visible, inst.full & ~later)
            assert inst.visible.sum() >= 0.3 * inst.full.sum()
            if not inst.iscrowd:
                assert not toy._has_hole(inst.visible)
            occluded += int(inst.visible.sum() < inst.full.sum())
            union_vis += inst.visible
            # the label map shows each object where it is visible
            assert (scene.semantic[inst.visible] == inst.label + 1).all()
        assert union_vis.max() <= 1  # visible parts never overlap
        things = np.isin(scene.semantic, np.arange(1, len(toy.THING_CLASSES) + 1))
        np.testing.assert_array_equal(things, union_vis > 0)
    assert occluded >= 1


def test_polygons_match_visible_masks():
    _need('pycocotools')
    from pycocotools import mask as mask_utils
    checked = 0
    for scene in _scenes():
        h, w = scene.semantic.shape
        anns = toy.scene_to_coco_annotations(scene, 1, 1)
        visible = [i.visible for i in scene.instances if i.visible.any()]
        assert len(anns) == len(visible)
        for ann, vis in zip(anns, visible):
            rle = mask_utils.frPyObjects(ann['segmentation'], h, w)
            dec = mask_utils.decode(mask_utils.merge(rle) if isinstance(rle, list) else rle).astype(bool)
            iou = (dec & vis).sum() / (dec | vis).sum()
            assert iou >= 0.95, iou
            checked += 1
    assert checked > 20


def test_classification_images_and_bad_values():
    rng = np.random.default_rng(0)
    img = toy.render_classification_image(rng, 3, size=64)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and img.std() > 5
    with pytest.raises(ValueError, match='label'):
        toy.render_classification_image(rng, len(toy.CLS_CLASSES))
    with pytest.raises(ValueError, match='min_objects'):
        toy.render_scene(rng, 64, 64, min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match='unknown datasets'):
        toy.make_toy_datasets('unused', only=['cityscapes'])
    with pytest.raises(ValueError, match='unknown dataset'):
        toy.dataset_metainfo('voc')


# ------------------------------------------------------------------------------------------ files
def test_coco_json_is_valid(toy_root):
    for split, n in (('train', SIZES['coco'][0]), ('val', SIZES['coco'][1])):
        with open(toy_root / 'coco' / 'annotations' / f'instances_{split}.json') as f:
            coco = json.load(f)
        assert [c['id'] for c in coco['categories']] == [1, 2, 3, 4]
        assert [c['name'] for c in coco['categories']] == list(toy.THING_CLASSES)
        images = {im['id']: im for im in coco['images']}
        assert len(images) == n
        for im in images.values():
            arr = cv2.imread(str(toy_root / 'coco' / split / im['file_name']))
            assert arr.shape == (im['height'], im['width'], 3)
            assert 128 <= im['height'] <= 160 and 128 <= im['width'] <= 160
        ids = [a['id'] for a in coco['annotations']]
        assert len(set(ids)) == len(ids) and len(ids) >= 2 * n
        for ann in coco['annotations']:
            im = images[ann['image_id']]
            x, y, w, h = ann['bbox']
            assert ann['category_id'] in (1, 2, 3, 4)
            assert w > 0 and h > 0 and ann['area'] > 0
            assert x >= 0 and y >= 0 and x + w <= im['width'] and y + h <= im['height']
            assert ann['area'] <= w * h
            if ann['iscrowd']:
                mask = toy.rle_to_mask(ann['segmentation'])
                assert ann['segmentation']['size'] == [im['height'], im['width']]
                assert mask.sum() == ann['area']
            else:
                polys = ann['segmentation']
                assert polys and all(len(p) % 2 == 0 and len(p) >= 6 for p in polys)
                pts = np.concatenate([np.reshape(p, (-1, 2)) for p in polys])
                assert pts[:, 0].min() == x and pts[:, 0].max() == x + w  # outlines follow pixel edges
                poly_area = sum(toy.polygon_area(p) for p in polys)
                assert abs(poly_area - ann['area']) <= 0.05 * ann['area'] + 4


def test_coco_has_crowds_in_rle(tmp_path):
    toy.make_coco(str(tmp_path), seed=3, num_train=3, num_val=1, crowd_prob=1.0)
    with open(tmp_path / 'annotations' / 'instances_train.json') as f:
        anns = json.load(f)['annotations']
    crowds = [a for a in anns if a['iscrowd']]
    assert len(crowds) == 3
    assert all(isinstance(a['segmentation']['counts'], list) for a in crowds)
    if _have('pycocotools'):
        from pycocotools.coco import COCO
        coco = COCO(str(tmp_path / 'annotations' / 'instances_train.json'))
        for a in crowds:
            np.testing.assert_array_equal(coco.annToMask(a).astype(bool), toy.rle_to_mask(a['segmentation']))


def test_ade_and_imagenet_files(toy_root):
    for folder, n in (('training', SIZES['ade'][0]), ('validation', SIZES['ade'][1])):
        pngs = sorted(os.listdir(toy_root / 'ade' / 'annotations' / folder))
        jpgs = sorted(os.listdir(toy_root / 'ade' / 'images' / folder))
        assert len(pngs) == n and [p[:-4] for p in pngs] == [j[:-4] for j in jpgs]
        for p, j in zip(pngs, jpgs):
            lab = cv2.imread(str(toy_root / 'ade' / 'annotations' / folder / p), cv2.IMREAD_UNCHANGED)
            img = cv2.imread(str(toy_root / 'ade' / 'images' / folder / j))
            assert lab.ndim == 2 and lab.shape == img.shape[:2]
            assert lab.max() <= len(toy.ADE_CLASSES)
            assert (lab == 0).any() and (lab == 5).any() and (lab == 6).any()  # unlabelled band, both regions
            assert (lab >= 1).mean() > 0.9
    for split, n in (('train', 2), ('val', 1)):
        lines = (toy_root / 'imagenet' / 'meta' / f'{split}.txt').read_text().splitlines()
        assert len(lines) == n * len(toy.CLS_CLASSES)
        for line in lines:
            rel, label = line.rsplit(' ', 1)
            assert rel.split('/')[0] == toy.CLS_CLASSES[int(label)]
            assert (toy_root / 'imagenet' / split / rel).is_file()
    classes = (toy_root / 'imagenet' / 'meta' / 'classes.txt').read_text().split()
    assert classes == list(toy.CLS_CLASSES) == sorted(toy.CLS_CLASSES)


def test_same_seed_same_bytes(toy_root, tmp_path):
    _make(tmp_path / 'again')
    _make(tmp_path / 'other', seed=1)
    for name in toy.DATASETS:
        a = toy.read_manifest(str(toy_root / name))
        b = toy.read_manifest(str(tmp_path / 'again' / name))
        c = toy.read_manifest(str(tmp_path / 'other' / name))
        assert a['files'] == b['files']  # sha256 of every file
        assert toy.verify_manifest(str(tmp_path / 'again' / name)) == []
        assert a['files'].keys() == c['files'].keys() and a['files'] != c['files']


def test_skip_rebuild_and_partial_detection(tmp_path):
    root = str(tmp_path)
    kw = dict(only=['coco'], num_train=2, num_val=1, log=lambda s: None)
    assert toy.make_toy_datasets(root, **kw) == {'coco': 'created'}
    done = osp.join(root, 'coco', 'DONE.json')
    mtime = os.stat(done).st_mtime_ns
    assert toy.make_toy_datasets(root, **kw) == {'coco': 'kept'}
    assert os.stat(done).st_mtime_ns == mtime
    assert toy.make_toy_datasets(root, **dict(kw, num_train=3)) == {'coco': 'kept (other settings)'}
    assert toy.make_toy_datasets(root, force=True, **kw) == {'coco': 'created'}
    # a file changed after the fact shows up in verification
    jpg = osp.join(root, 'coco', 'train', '000000000001.jpg')
    with open(jpg, 'ab') as f:
        f.write(b'x')
    assert toy.verify_manifest(osp.join(root, 'coco')) == ['train/000000000001.jpg (changed)']
    # a folder without its manifest is incomplete and rebuilt
    os.remove(done)
    assert not toy.is_complete(osp.join(root, 'coco'))
    assert toy.make_toy_datasets(root, **kw) == {'coco': 'created'}
    assert toy.verify_manifest(osp.join(root, 'coco')) == []
    assert sorted(os.listdir(root)) == ['coco']  # no temporary folder left behind


def test_cli(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        'make_toy_datasets_cli', osp.join(ROOT, 'tools', 'dataset_converters', 'make_toy_datasets.py'))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = ['--root', str(tmp_path), '--only', 'imagenet', '--num-train', '1', '--num-val', '1', '--seed', '5']
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert 'imagenet: wrote' in out and str(tmp_path) in out
    assert toy.read_manifest(str(tmp_path / 'imagenet'))['seed'] == 5
    assert cli.main(args) == 0
    assert 'kept' in capsys.readouterr().out
    assert cli.main(['--root', str(tmp_path), '--num-train', '0']) == 2


# ------------------------------------------------------------------------------------------ libraries
def test_mmdet_coco_dataset_loads(toy_root):
    _need('mmdet')
    _need('pycocotools')
    from mmcv.transforms import LoadImageFromFile
    from mmdet.datasets import CocoDataset
    from mmdet.datasets.transforms import LoadAnnotations
    ds = CocoDataset(data_root=str(toy_root / 'coco'), ann_file='annotations/instances_train.json',
                     data_prefix=dict(img='train/'), metainfo=dict(classes=toy.THING_CLASSES),
                     filter_cfg=dict(filter_empty_gt=True, min_size=32),
                     pipeline=[LoadImageFromFile(), LoadAnnotations(with_bbox=True, with_mask=True)])
    assert len(ds) == SIZES['coco'][0]
    with open(toy_root / 'coco' / 'annotations' / 'instances_train.json') as f:
        coco = json.load(f)
    for idx in range(len(ds)):
        item = ds[idx]
        img_id = ds.get_data_info(idx)['img_id']
        anns = [a for a in coco['annotations'] if a['image_id'] == img_id]
        assert len(item['gt_bboxes']) == len(anns)
        masks = item['gt_masks'].to_ndarray()
        assert masks.shape[1:] == item['img'].shape[:2]
        np.testing.assert_array_equal(item['gt_ignore_flags'], [bool(a['iscrowd']) for a in anns])
        np.testing.assert_array_equal(item['gt_bboxes_labels'], [a['category_id'] - 1 for a in anns])
        for m, a in zip(masks, anns):
            assert abs(int(m.sum()) - a['area']) <= 0.05 * a['area'] + 4


def test_perfect_predictions_score_one_with_coco_metric(toy_root):
    _need('mmdet')
    _need('pycocotools')
    import torch
    from mmdet.evaluation import CocoMetric
    from pycocotools.coco import COCO
    ann_file = str(toy_root / 'coco' / 'annotations' / 'instances_val.json')
    coco = COCO(ann_file)
    metric = CocoMetric(ann_file=ann_file, metric=['bbox', 'segm'])
    metric.dataset_meta = dict(classes=toy.THING_CLASSES)
    for img_id, info in coco.imgs.items():
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=[img_id])) if not a['iscrowd']]
        boxes = torch.tensor([[a['bbox'][0], a['bbox'][1], a['bbox'][0] + a['bbox'][2], a['bbox'][1] + a['bbox'][3]]
                              for a in anns])
        masks = torch.from_numpy(np.stack([coco.annToMask(a) for a in anns]).astype(bool))
        pred = dict(bboxes=boxes, scores=torch.linspace(1, 0.5, len(anns)),
                    labels=torch.tensor([a['category_id'] - 1 for a in anns]), masks=masks)
        metric.process({}, [dict(img_id=img_id, ori_shape=(info['height'], info['width']), pred_instances=pred)])
    res = metric.evaluate(size=len(coco.imgs))
    assert res['coco/bbox_mAP'] == pytest.approx(1.0, abs=1e-3)
    assert res['coco/segm_mAP'] == pytest.approx(1.0, abs=1e-3)


def test_mmseg_dataset_loads(toy_root):
    _need('mmseg')
    from mmcv.transforms import LoadImageFromFile
    from mmseg.datasets import BaseSegDataset
    from mmseg.datasets.transforms import LoadAnnotations
    ds = BaseSegDataset(data_root=str(toy_root / 'ade'), img_suffix='.jpg', seg_map_suffix='.png',
                        data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
                        reduce_zero_label=True, metainfo=toy.dataset_metainfo('ade'),
                        pipeline=[LoadImageFromFile(), LoadAnnotations()])
    assert len(ds) == SIZES['ade'][1]
    item = ds[0]
    raw = cv2.imread(item['seg_map_path'], cv2.IMREAD_UNCHANGED)
    seg = item['gt_seg_map']
    assert seg.shape == item['img'].shape[:2]
    np.testing.assert_array_equal(seg == 255, raw == 0)  # unlabelled pixels are ignored
    np.testing.assert_array_equal(seg[raw > 0], raw[raw > 0] - 1)
    assert set(np.unique(seg)) <= set(range(len(toy.ADE_CLASSES))) | {255}


def test_mmpretrain_datasets_load(toy_root):
    _need('mmpretrain')
    from mmpretrain.datasets import CustomDataset, ImageNet
    root = str(toy_root / 'imagenet')
    listed = CustomDataset(data_root=root, ann_file='meta/train.txt', data_prefix='train',
                           metainfo=dict(classes=toy.CLS_CLASSES))
    scanned = CustomDataset(data_root=root, data_prefix='train')
    assert scanned.CLASSES == toy.CLS_CLASSES
    assert len(listed) == len(scanned) == 2 * len(toy.CLS_CLASSES)
    pairs = sorted((osp.relpath(d['img_path'], root), int(d['gt_label'])) for d in listed.load_data_list())
    assert pairs == sorted((osp.relpath(d['img_path'], root), int(d['gt_label'])) for d in scanned.load_data_list())
    inet = ImageNet(data_root=root, split='val', metainfo=dict(classes=toy.CLS_CLASSES))
    assert len(inet) == len(toy.CLS_CLASSES)
    assert sorted(int(inet.get_data_info(i)['gt_label']) for i in range(len(inet))) == list(range(6))


def _doc_blocks():
    import re
    with open(osp.join(ROOT, 'docs', 'toy_datasets.md')) as f:
        text = f.read()
    return [b for b in re.findall(r'```python\n(.*?)```', text, re.S) if 'data_root = ' in b]


@pytest.mark.parametrize('name,library', [('coco', 'mmdet'), ('ade', 'mmseg'), ('imagenet', 'mmpretrain')])
def test_documented_configs_build(toy_root, name, library):
    _need(library)
    registry = importlib.import_module(f'{library}.registry')
    importlib.import_module(f'{library}.utils').register_all_modules(init_default_scope=False)
    from mmengine.registry import init_default_scope
    init_default_scope(library)  # builds must not depend on the scope another test left current
    (block,) = [b for b in _doc_blocks() if f"data_root = 'data/toy/{name}/'" in b]
    ns = {}
    exec(block.replace(f'data/toy/{name}/', f'{toy_root}/{name}/'), ns)
    n_train, n_val = SIZES[name]
    per = len(toy.CLS_CLASSES) if name == 'imagenet' else 1
    for key, n in (('train_dataloader', n_train), ('val_dataloader', n_val)):
        cfg = dict(ns[key]['dataset'], pipeline=[])
        ds = registry.DATASETS.build(cfg)
        assert len(ds) == n * per
        assert tuple(ds.metainfo['classes']) == toy.dataset_metainfo(name)['classes']
    if 'val_evaluator' in ns and name == 'coco':
        assert osp.isfile(ns['val_evaluator']['ann_file'])
