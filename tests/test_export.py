"""Whole-model ONNX export (dynconv_mm.export, tools/deployment/export_onnx.py): a Mask R-CNN with a KW
backbone and an UperNet with a dynamic DWNet, exported once with dynamic batch, height and width, give
in onnxruntime what mmdet's ``predict`` and mmseg's ``encode_decode`` give on real photos of other
batch sizes and shapes."""
import glob
import os.path as osp

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip('mmdet')
pytest.importorskip('mmseg')
ort = pytest.importorskip('onnxruntime')
pytest.importorskip('onnx')

from conftest import ROOT, randomize_norms, shared_path  # noqa: E402

import dynconv_mm  # noqa: E402
from dynconv_mm.apis import build_model, load_config  # noqa: E402
from dynconv_mm.export import (  # noqa: E402
    DETECTOR_MIN_OPSET,
    ExportAdaptiveAvgPool2d,
    ExportError,
    build_export_module,
    export_onnx,
    paste_masks,
)

QUICKSTART = osp.join(ROOT, 'configs', '_quickstart_')
# (image count, height, width) of the photo batches run through each exported graph (traced at 1 x 128 x 128)
BATCHES = [(1, 128, 128), (2, 96, 160)]


def _photo_batches(folder: str, model, sample_cls):
    """Real photos resized to each of :data:`BATCHES` and run through the model's data preprocessor."""
    import mmcv
    photos = sorted(glob.glob(osp.join(folder, '*.jpg')))
    assert len(photos) >= sum(n for n, _, _ in BATCHES)
    start = 0
    for n, h, w in BATCHES:
        data = dict(inputs=[], data_samples=[])
        for path in photos[start:start + n]:
            img = mmcv.imresize(mmcv.imread(path), (w, h))
            data['inputs'].append(torch.from_numpy(img).permute(2, 0, 1).contiguous())
            data['data_samples'].append(sample_cls(metainfo=dict(img_shape=(h, w), ori_shape=(h, w),
                                                                 scale_factor=(1.0, 1.0))))
        start += n
        out = model.data_preprocessor(data, False)
        yield out['inputs'], out['data_samples']


@pytest.fixture(scope='module')
def mask_rcnn():
    """The quick-start Mask R-CNN (KW ResNet-18 backbone) with decisive random heads: spread-out scores, so
    that rounding differences cannot reorder candidates at the NMS and top-k cut-offs."""
    torch.manual_seed(0)
    model = build_model(load_config(osp.join(QUICKSTART, 'mask-rcnn_kw1x-r18_fpn_toy-coco.py')))
    model.init_weights()
    randomize_norms(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.rpn_head.rpn_cls.weight.mul_(30)
        model.roi_head.bbox_head.fc_cls.weight.normal_(0, 0.05, generator=g)
        model.roi_head.bbox_head.fc_reg.weight.normal_(0, 0.01, generator=g)
    dynconv_mm.set_temperature(model, 0.3)  # both terms of the KW attention in the graph
    return model.eval()


def test_mask_rcnn_kw_onnx_matches_mmdet_on_real_photos(mask_rcnn, tmp_path):
    from mmdet.models.roi_heads.mask_heads.fcn_mask_head import _do_paste_mask
    from mmdet.structures import DetDataSample

    path = str(tmp_path / 'mask_rcnn.onnx')
    rep = export_onnx(mask_rcnn, path, input_shape=(1, 3, 128, 128), verify=False)
    assert rep['kind'] == 'detector' and rep['outputs'] == ['dets', 'labels', 'masks']
    assert rep['dynamic_axes']['input'] == {0: 'batch', 2: 'height', 3: 'width'}
    sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    max_dets = mask_rcnn.roi_head.test_cfg.max_per_img
    for x, samples in _photo_batches(shared_path('data', 'coco_real', 'val'), mask_rcnn, DetDataSample):
        with torch.no_grad():
            results = mask_rcnn.predict(x, samples, rescale=False)
        dets, labels, masks = sess.run(None, {'input': x.numpy()})
        B, _, H, W = x.shape
        assert dets.shape == (B, max_dets, 5) and labels.shape == (B, max_dets) and masks.shape[:2] == (B, max_dets)
        for b, res in enumerate(results):
            ref = res.pred_instances
            n = int((labels[b] >= 0).sum())
            assert n == len(ref.bboxes) > 0
            assert (labels[b, n:] == -1).all() and (dets[b, n:] == 0).all()
            np.testing.assert_allclose(dets[b, :n, :4], ref.bboxes.numpy(), rtol=0, atol=1e-3)
            np.testing.assert_allclose(dets[b, :n, 4], ref.scores.numpy(), rtol=0, atol=1e-5)
            np.testing.assert_array_equal(labels[b, :n], ref.labels.numpy())
            pasted, _ = _do_paste_mask(torch.from_numpy(masks[b, :n, None]), torch.from_numpy(dets[b, :n, :4]),
                                       H, W, skip_empty=False)
            pasted = (pasted >= mask_rcnn.roi_head.test_cfg.mask_thr_binary).numpy()
            ref_masks = ref.masks.numpy()
            assert ref_masks.sum() > 0
            assert (pasted != ref_masks).mean() < 1e-4
            # the numpy paste for deployments without PyTorch is mmdet's
            assert (paste_masks(masks[b, :n], dets[b, :n, :4], H, W) != pasted).mean() < 1e-4


def test_upernet_dynamic_dwnet_onnx_matches_mmseg_on_real_photos(tmp_path):
    from mmseg.structures import SegDataSample

    model = build_model(load_config(osp.join(QUICKSTART, 'upernet_dynamic-dwnet_toy-ade.py')))
    randomize_norms(model)
    model.eval()
    dynconv_mm.set_temperature(model, 5.0)  # the decode head's DY-Conv layers
    path = str(tmp_path / 'upernet.onnx')
    rep = export_onnx(model, path, input_shape=(1, 3, 128, 128), verify=False)
    assert rep['kind'] == 'segmentor' and rep['dynamic_axes']['seg_logits'] == {0: 'batch', 2: 'height', 3: 'width'}
    sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    for x, samples in _photo_batches(shared_path('data', 'ade_real', 'images', 'validation'), model, SegDataSample):
        with torch.no_grad():
            ref = model.encode_decode(x, [s.metainfo for s in samples]).numpy()
        got = sess.run(None, {'input': x.numpy()})[0]
        assert got.shape == ref.shape == (x.shape[0], 6, *x.shape[2:])
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
        assert (got.argmax(1) != ref.argmax(1)).mean() < 1e-4


@pytest.mark.parametrize('out,size', [((2, 3), (7, 9)), (6, (4, 4)), ((3, 3), (12, 5)), (1, (5, 7))])
def test_export_adaptive_pool_is_adaptive_pool(out, size):
    x = torch.randn(2, 3, *size)
    torch.testing.assert_close(ExportAdaptiveAvgPool2d(out)(x), nn.AdaptiveAvgPool2d(out)(x), rtol=1e-6, atol=1e-6)


def test_paste_masks_matches_mmdet():
    from mmdet.models.roi_heads.mask_heads.fcn_mask_head import _do_paste_mask
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(5, 28, 28, generator=g)
    boxes = torch.tensor([[3.2, 4.7, 40.1, 30.0], [-5.0, 10.0, 20.0, 70.0], [50.0, 2.0, 63.5, 47.9],
                          [10.0, 10.0, 10.5, 30.0], [0.0, 0.0, 64.0, 48.0]])
    ref, _ = _do_paste_mask(masks[:, None], boxes, 48, 64, skip_empty=False)
    np.testing.assert_allclose(paste_masks(masks.numpy(), boxes.numpy(), 48, 64, threshold=None), ref.numpy(),
                               atol=1e-5)
    assert (paste_masks(masks.numpy(), boxes.numpy(), 48, 64) != (ref >= 0.5).numpy()).mean() < 1e-3


def test_export_refuses_what_it_cannot_export(mask_rcnn, tmp_path):
    with pytest.raises(ExportError, match=f'opset {DETECTOR_MIN_OPSET}'):
        export_onnx(mask_rcnn, str(tmp_path / 'x.onnx'), input_shape=(1, 3, 64, 64), opset=13)
    with pytest.raises(ExportError, match='exportable models are'):
        build_export_module(nn.Conv2d(3, 3, 1))

    class CascadeRoIHead(nn.Module):
        pass

    class Fake(nn.Module):
        def __init__(self):
            super().__init__()
            self.rpn_head = mask_rcnn.rpn_head
            self.roi_head = CascadeRoIHead()

        def extract_feat(self, x):
            return x

    with pytest.raises(ExportError, match='only StandardRoIHead exports, got CascadeRoIHead'):
        build_export_module(Fake())
    assert not (tmp_path / 'x.onnx').exists()


def test_export_tool_on_a_classifier(tmp_path, capsys):
    """The CLI on the quick-start KW classifier: writes the graph, checks it at another batch and size."""
    import importlib.util
    spec = importlib.util.spec_from_file_location('export_onnx_tool',
                                                  osp.join(ROOT, 'tools', 'deployment', 'export_onnx.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = str(tmp_path / 'cls.onnx')
    config = osp.join(QUICKSTART, 'kw1x-r18_toy-in6.py')
    assert tool.main([config, '--out', out, '--shape', '64', '64', '--temperature', '0.5']) == 0
    printed = capsys.readouterr().out
    assert 'classifier' in printed and 'input -> logits' in printed
    assert 'at input (2, 3, 96, 96)' in printed  # the automatic second check: batch + 1, size + 32
    sess = ort.InferenceSession(out, providers=['CPUExecutionProvider'])
    assert sess.run(None, {'input': np.zeros((3, 3, 64, 96), np.float32)})[0].shape == (3, 6)
    assert tool.main([config, '--out', str(tmp_path / 'old.onnx'), '--opset', '9']) == 1
    assert 'opset 11 or newer' in capsys.readouterr().err
