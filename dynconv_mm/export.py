"""Whole-model ONNX export (TorchScript exporter) for mmdet two-stage detectors, mmseg encoder-decoders
and mmpretrain classifiers built from dynconv_mm configs.

:func:`export_onnx` is the library side of ``tools/deployment/export_onnx.py`` (``docs/export.md``
says what the graphs contain and what they leave out). Each model family gets a wrapper module whose
``forward`` takes the network input (the batch the model's data preprocessor makes: normalised,
channel order fixed, padded) and returns plain tensors:

* detectors (Faster / Mask R-CNN: ``RPNHead`` + ``StandardRoIHead``): ``dets (B, D, 5)`` (boxes
  ``x1, y1, x2, y2`` in input pixels and the score), ``labels (B, D)`` (``-1`` marks an empty slot)
  and, with a mask head, ``masks (B, D, M, M)``: each detection's mask probabilities on its box
  (:func:`paste_masks` puts them into the image). ``D`` is ``test_cfg.rcnn.max_per_img``. Anchors,
  box decoding, both NMS stages (ONNX ``NonMaxSuppression``) and RoIAlign (ONNX ``RoiAlign``,
  opset >= 16 for its half-pixel mode) are in the graph; the computation is mmdet's ``predict``
  with ``rescale=False``, written with batch- and size-independent tensor operations.
* segmentors: ``seg_logits (B, K, H, W)``, the decode head's logits resized to the input size
  (mmseg's ``encode_decode``, whole-image mode).
* classifiers: ``logits (B, K)``.

The batch axis is dynamic; height and width are dynamic too unless asked otherwise
(``nn.AdaptiveAvgPool2d`` layers with an output larger than 1x1, e.g. UperNet's pyramid pooling,
are swapped for an equivalent whose windows are computed from the input size).
"""
from __future__ import annotations

import copy
import math
import os
import os.path as osp
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .layers.torch_internals import onnx_export_kwargs

__all__ = ['ExportError', 'export_onnx', 'build_export_module', 'paste_masks', 'DetectorExport',
           'SegmentorExport', 'ClassifierExport', 'ExportAdaptiveAvgPool2d', 'MIN_OPSET', 'DETECTOR_MIN_OPSET']

#: the TorchScript exporter's ``NonMaxSuppression`` / ``Range`` / dynamic ``Resize`` need opset 11
MIN_OPSET = 11
#: ONNX ``RoiAlign`` has mmcv's / torchvision's ``aligned=True`` (``half_pixel``) from opset 16 on
DETECTOR_MIN_OPSET = 16
_INVALID = -1.0   # score of an empty slot: real scores are probabilities (>= 0)


class ExportError(RuntimeError):
    """The model cannot be exported (unsupported part, opset, shape) or the export does not reproduce it."""


# ------------------------------------------------------------------------------------ graph primitives
class _BatchedNMS(torch.autograd.Function):
    """Per-image NMS of ``boxes (B, N, 4)`` / ``scores (B, N)``: ``(M, 2)`` rows ``(image, box index)``.

    A box takes part when its score is above ``score_thr``; at most ``max_per_image`` are kept per
    image, in decreasing score order (greedy NMS; IoU above ``iou`` suppresses). Eager: torchvision's
    ``nms`` per image. ONNX: one ``NonMaxSuppression`` node (batch = images, one class).
    """

    @staticmethod
    def forward(ctx, boxes, scores, max_per_image: int, iou: float, score_thr: float):
        import torchvision
        rows = []
        for b in range(boxes.shape[0]):
            cand = torch.nonzero(scores[b] > score_thr).squeeze(1)
            keep = torchvision.ops.nms(boxes[b, cand], scores[b, cand], iou)[:max_per_image]
            idx = cand[keep]
            rows.append(torch.stack([torch.full_like(idx, b), idx], 1))
        return torch.cat(rows, 0) if rows else boxes.new_zeros((0, 2), dtype=torch.long)

    @staticmethod
    def symbolic(g, boxes, scores, max_per_image, iou, score_thr):
        from torch.onnx import symbolic_helper
        scores3 = symbolic_helper._unsqueeze_helper(g, scores, [1])
        selected = g.op('NonMaxSuppression', boxes, scores3,
                        g.op('Constant', value_t=torch.tensor([max_per_image], dtype=torch.long)),
                        g.op('Constant', value_t=torch.tensor([iou], dtype=torch.float)),
                        g.op('Constant', value_t=torch.tensor([score_thr], dtype=torch.float)))
        return g.op('Gather', selected, g.op('Constant', value_t=torch.tensor([0, 2], dtype=torch.long)), axis_i=1)


def _gather_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t (B, N, *rest)`` at ``idx (B, K)`` -> ``(B, K, *rest)``."""
    rest = t.shape[2:]
    view = idx.reshape(idx.shape[0], idx.shape[1], *([1] * len(rest)))
    return t.gather(1, view.expand(-1, -1, *rest))


def _keep_top(scores: torch.Tensor, selected: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best NMS survivors of each image: ``(top scores, indices)``, each ``(B, k)``; empty
    slots have score :data:`_INVALID` and index ``N`` or above (a padding row)."""
    kept = torch.full_like(scores, _INVALID)
    kept[selected[:, 0], selected[:, 1]] = scores[selected[:, 0], selected[:, 1]]
    kept = F.pad(kept, (0, k), value=_INVALID)
    return kept.topk(k, dim=1)


def _class_aware_nms(boxes, scores, groups, valid, cfg: dict, max_per_image: int, score_thr: float):
    """mmcv's ``batched_nms`` per image (boxes of different ``groups`` never suppress each other):
    the boxes are shifted by ``group * (largest valid coordinate + 1)`` as mmcv does."""
    masked = torch.where(valid[..., None], boxes, torch.full_like(boxes, -math.inf))
    top = masked.amax(dim=(1, 2))
    top = torch.where(valid.sum(1) > 0, top, torch.zeros_like(top))
    offsets = groups.to(boxes) * (top[:, None] + torch.tensor(1).to(boxes))
    scores = torch.where(valid, scores, torch.full_like(scores, _INVALID))
    selected = _BatchedNMS.apply(boxes + offsets[..., None], scores, int(max_per_image),
                                 float(cfg['iou_threshold']), float(score_thr))
    return scores, selected


def _check_nms(cfg: dict, where: str) -> dict:
    cfg = dict(cfg)
    if cfg.get('type', 'nms') != 'nms' or cfg.get('class_agnostic', False) or cfg.get('offset', 0) != 0:
        raise ExportError(f'{where}: only plain class-aware NMS (type="nms", offset 0) exports, got {cfg}')
    return cfg


def _delta2bbox(rois: torch.Tensor, deltas: torch.Tensor, coder, size_wh: Optional[torch.Tensor],
                wh_ratio_clip: float = 16 / 1000) -> torch.Tensor:
    """mmdet's ``delta2bbox`` (same operations in the same order) for ``rois``/``deltas`` of equal
    shape ``(..., 4)``, clipped to ``size_wh = (W, H)`` (a tensor: the input size)."""
    means = deltas.new_tensor(coder.means)
    stds = deltas.new_tensor(coder.stds)
    denorm = deltas * stds + means
    dxy, dwh = denorm[..., :2], denorm[..., 2:]
    pxy = (rois[..., :2] + rois[..., 2:]) * 0.5
    pwh = rois[..., 2:] - rois[..., :2]
    dxy_wh = pwh * dxy
    max_ratio = float(np.abs(np.log(wh_ratio_clip)))
    if coder.add_ctr_clamp:
        dxy_wh = torch.clamp(dxy_wh, max=coder.ctr_clamp, min=-coder.ctr_clamp)
        dwh = torch.clamp(dwh, max=max_ratio)
    else:
        dwh = dwh.clamp(min=-max_ratio, max=max_ratio)
    gxy = pxy + dxy_wh
    gwh = pwh * dwh.exp()
    boxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
    if coder.clip_border and size_wh is not None:
        boxes = torch.minimum(boxes.clamp(min=0), torch.cat([size_wh, size_wh]))
    return boxes


def _roi_features(extractor, feats: Sequence[torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
    """mmdet's ``SingleRoIExtractor`` with torchvision's ``roi_align`` (ONNX ``RoiAlign``): every RoI
    is pooled on every level and the level mmdet maps it to is kept (no data-dependent shapes)."""
    from torchvision.ops import roi_align
    feats = feats[:extractor.num_inputs]
    num_levels = len(feats)
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    levels = torch.floor(torch.log2(scale / extractor.finest_scale + 1e-6)).clamp(min=0, max=num_levels - 1)
    out = None
    for i, (feat, layer) in enumerate(zip(feats, extractor.roi_layers)):
        pooled = roi_align(feat, rois, tuple(layer.output_size), float(layer.spatial_scale),
                           int(layer.sampling_ratio), bool(layer.aligned))
        pooled = pooled * (levels == i).to(pooled)[:, None, None, None]
        out = pooled if out is None else out + pooled
    return out


def _check_roi_extractor(extractor, where: str) -> None:
    name = type(extractor).__name__
    if name != 'SingleRoIExtractor':
        raise ExportError(f'{where}: only SingleRoIExtractor exports, got {name}')
    for layer in extractor.roi_layers:
        if type(layer).__name__ != 'RoIAlign' or getattr(layer, 'pool_mode', 'avg') != 'avg':
            raise ExportError(f'{where}: only RoIAlign layers with pool_mode="avg" export, got {layer}')


# ------------------------------------------------------------------------------------ model wrappers
class DetectorExport(nn.Module):
    """A Faster / Mask R-CNN (mmdet ``TwoStageDetector`` with ``RPNHead`` and ``StandardRoIHead``) as
    ``input -> dets, labels[, masks]`` (see the module docstring)."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self._check(detector)
        self.detector = detector
        self.rpn_cfg = detector.rpn_head.test_cfg
        self.rcnn_cfg = detector.roi_head.test_cfg
        self.with_mask = bool(getattr(detector.roi_head, 'with_mask', False))
        self.output_names = ['dets', 'labels'] + (['masks'] if self.with_mask else [])

    @staticmethod
    def _check(det) -> None:
        where = type(det).__name__
        rpn, roi = getattr(det, 'rpn_head', None), getattr(det, 'roi_head', None)
        if rpn is None or roi is None or not hasattr(det, 'extract_feat'):
            raise ExportError(f'{where} is not a two-stage detector (rpn_head + roi_head); exportable detectors: '
                              'Faster R-CNN and Mask R-CNN (RPNHead + StandardRoIHead)')
        if type(rpn).__name__ != 'RPNHead' or not rpn.use_sigmoid_cls:
            raise ExportError(f'{where}: only RPNHead with sigmoid scores exports, got {type(rpn).__name__}')
        if type(roi).__name__ != 'StandardRoIHead':
            raise ExportError(f'{where}: only StandardRoIHead exports, got {type(roi).__name__} (cascade and '
                              'hybrid-task heads are not covered)')
        if getattr(roi, 'with_shared_head', False) or getattr(roi, 'share_roi_extractor', False):
            raise ExportError(f'{where}: RoI heads with a shared head or a shared RoI extractor do not export')
        for head, coder in ((rpn, rpn.bbox_coder), (roi.bbox_head, roi.bbox_head.bbox_coder)):
            if type(coder).__name__ != 'DeltaXYWHBBoxCoder':
                raise ExportError(f'{where}: only DeltaXYWHBBoxCoder exports, got {type(coder).__name__} in '
                                  f'{type(head).__name__}')
        if type(rpn.prior_generator).__name__ != 'AnchorGenerator':
            raise ExportError(f'{where}: only AnchorGenerator exports, got {type(rpn.prior_generator).__name__}')
        if getattr(roi.bbox_head, 'custom_cls_channels', False):
            raise ExportError(f'{where}: bbox heads with a custom classification activation do not export')
        _check_roi_extractor(roi.bbox_roi_extractor, where)
        if getattr(roi, 'with_mask', False):
            _check_roi_extractor(roi.mask_roi_extractor, where)
            if getattr(roi.mask_head, 'class_agnostic', False):
                raise ExportError(f'{where}: class-agnostic mask heads are not covered')
        _check_nms(rpn.test_cfg.nms, f'{where} rpn')
        _check_nms(roi.test_cfg.nms, f'{where} rcnn')

    # -- stage 1
    def _anchors(self, level: int, feat: torch.Tensor) -> torch.Tensor:
        gen = self.detector.rpn_head.prior_generator
        base = gen.base_anchors[level].to(feat)
        h, w = feat.shape[-2:]
        stride_w, stride_h = gen.strides[level]
        shift_x = torch.arange(0, w, device=feat.device).to(feat.dtype) * stride_w
        shift_y = torch.arange(0, h, device=feat.device).to(feat.dtype) * stride_h
        xx = shift_x[None, :].expand(h, w).reshape(-1)
        yy = shift_y[:, None].expand(h, w).reshape(-1)
        shifts = torch.stack([xx, yy, xx, yy], dim=-1)
        return (base[None, :, :] + shifts[:, None, :]).reshape(-1, 4)

    def _proposals(self, feats, size_wh):
        rpn, cfg = self.detector.rpn_head, self.rpn_cfg
        cls_scores, bbox_preds = rpn(feats)
        nms_pre = int(cfg.get('nms_pre', -1))
        boxes, scores, levels = [], [], []
        for lvl, (cls, reg) in enumerate(zip(cls_scores, bbox_preds)):
            B = cls.shape[0]
            score = cls.permute(0, 2, 3, 1).reshape(B, -1).sigmoid()
            delta = reg.permute(0, 2, 3, 1).reshape(B, -1, 4)
            anchors = self._anchors(lvl, cls)
            if nms_pre > 0:
                # the nms_pre best of each level; padding keeps k valid when a level has fewer anchors
                top, idx = F.pad(score, (0, nms_pre), value=_INVALID).topk(nms_pre, dim=1)
                delta = _gather_rows(F.pad(delta, (0, 0, 0, nms_pre)), idx)
                anchors = F.pad(anchors, (0, 0, 0, nms_pre))[idx]
                score = top
            else:
                anchors = anchors[None].expand(B, -1, -1)
            boxes.append(_delta2bbox(anchors, delta, rpn.bbox_coder, size_wh))
            scores.append(score)
            levels.append(torch.full_like(score, lvl, dtype=torch.long))
        boxes, scores, levels = torch.cat(boxes, 1), torch.cat(scores, 1), torch.cat(levels, 1)
        valid = scores >= 0
        min_size = cfg.get('min_bbox_size', -1)
        if min_size >= 0:
            wh = boxes[..., 2:] - boxes[..., :2]
            valid = valid & (wh[..., 0] > min_size) & (wh[..., 1] > min_size)
        k = int(cfg.max_per_img)
        scores, selected = _class_aware_nms(boxes, scores, levels, valid, _check_nms(cfg.nms, 'rpn'), k, -0.5)
        top, idx = _keep_top(scores, selected, k)
        return _gather_rows(F.pad(boxes, (0, 0, 0, k)), idx), top >= 0

    # -- stage 2
    @staticmethod
    def _rois(boxes: torch.Tensor) -> torch.Tensor:
        B, K = boxes.shape[:2]
        img = torch.arange(B, device=boxes.device).to(boxes.dtype)[:, None, None].expand(-1, K, 1)
        return torch.cat([img, boxes], -1).reshape(-1, 5)

    def _detections(self, feats, proposals, proposal_valid, size_wh):
        roi, cfg = self.detector.roi_head, self.rcnn_cfg
        head = roi.bbox_head
        B, K = proposals.shape[:2]
        cls_score, bbox_pred = head(_roi_features(roi.bbox_roi_extractor, feats, self._rois(proposals)))
        C = head.num_classes
        scores = F.softmax(cls_score, dim=-1).reshape(B, K, C + 1)[..., :C]
        deltas = bbox_pred.reshape(B, K, -1, 4).expand(-1, -1, C, -1)
        boxes = _delta2bbox(proposals[:, :, None, :].expand(-1, -1, C, -1), deltas, head.bbox_coder, size_wh)
        boxes, scores = boxes.reshape(B, K * C, 4), scores.reshape(B, K * C)
        labels = torch.arange(C, device=scores.device)[None, None, :].expand(B, K, C).reshape(B, K * C)
        score_thr = float(cfg.score_thr)
        valid = proposal_valid[:, :, None].expand(-1, -1, C).reshape(B, K * C) & (scores > score_thr)
        D = int(cfg.max_per_img)
        scores, selected = _class_aware_nms(boxes, scores, labels, valid, _check_nms(cfg.nms, 'rcnn'), D, score_thr)
        top, idx = _keep_top(scores, selected, D)
        keep = top >= 0
        det_boxes = _gather_rows(F.pad(boxes, (0, 0, 0, D)), idx) * keep[..., None].to(boxes)
        det_labels = torch.where(keep, _gather_rows(F.pad(labels, (0, D)), idx), torch.full_like(idx, -1))
        det_scores = torch.where(keep, top, torch.zeros_like(top))
        return det_boxes, det_scores, det_labels

    def _masks(self, feats, boxes, labels):
        roi = self.detector.roi_head
        B, D = boxes.shape[:2]
        preds = roi.mask_head(_roi_features(roi.mask_roi_extractor, feats, self._rois(boxes)))
        size = preds.shape[-2:]
        preds = preds.reshape(B, D, -1, *size)
        index = labels.clamp(min=0).reshape(B, D, 1, 1, 1).expand(-1, -1, 1, *size)
        masks = preds.gather(2, index).squeeze(2).sigmoid()
        return masks * (labels >= 0).to(masks)[..., None, None]

    def forward(self, x: torch.Tensor):
        feats = self.detector.extract_feat(x)
        size_wh = torch.stack([torch.tensor(x.shape[3]), torch.tensor(x.shape[2])]).to(x.dtype)
        proposals, valid = self._proposals(feats, size_wh)
        boxes, scores, labels = self._detections(feats, proposals, valid, size_wh)
        dets = torch.cat([boxes, scores[..., None]], -1)
        if not self.with_mask:
            return dets, labels
        return dets, labels, self._masks(feats, boxes, labels)


class SegmentorExport(nn.Module):
    """An mmseg ``EncoderDecoder`` as ``input -> seg_logits`` (logits resized to the input size)."""

    output_names = ['seg_logits']

    def __init__(self, segmentor: nn.Module):
        super().__init__()
        if not (hasattr(segmentor, 'decode_head') and hasattr(segmentor, 'extract_feat')):
            raise ExportError(f'{type(segmentor).__name__} is not an mmseg encoder-decoder')
        if type(segmentor).__name__ != 'EncoderDecoder':
            raise ExportError(f'only EncoderDecoder segmentors export, got {type(segmentor).__name__}')
        self.segmentor = segmentor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.segmentor.decode_head(self.segmentor.extract_feat(x))
        return F.interpolate(logits, size=x.shape[2:], mode='bilinear',
                             align_corners=self.segmentor.decode_head.align_corners)


class ClassifierExport(nn.Module):
    """An mmpretrain ``ImageClassifier`` as ``input -> logits``."""

    output_names = ['logits']

    def __init__(self, classifier: nn.Module):
        super().__init__()
        if not getattr(classifier, 'with_head', False):
            raise ExportError(f'{type(classifier).__name__} has no classification head')
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x, mode='tensor')


class ExportAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d`` whose windows are computed from the input size inside the graph (the
    exporter can only bake them in for one input size). Window ``i`` of ``o`` over ``n`` positions:
    ``[floor(i n / o), ceil((i + 1) n / o))``, as PyTorch's adaptive pooling."""

    def __init__(self, output_size):
        super().__init__()
        size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        if any(s is None for s in size):
            raise ExportError('adaptive pooling with a None output size does not export with dynamic shapes')
        self.output_size = tuple(int(s) for s in size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        oh, ow = self.output_size
        h, w = x.shape[-2:]
        rows = []
        for i in range(oh):
            h0, h1 = (i * h) // oh, ((i + 1) * h + oh - 1) // oh
            cells = []
            for j in range(ow):
                w0, w1 = (j * w) // ow, ((j + 1) * w + ow - 1) // ow
                cells.append(x[..., h0:h1, w0:w1].mean(dim=(-2, -1), keepdim=True))
            rows.append(torch.cat(cells, -1))
        return torch.cat(rows, -2)


def _swap_adaptive_pools(model: nn.Module) -> int:
    count = 0
    for name, child in list(model.named_children()):
        if isinstance(child, nn.AdaptiveAvgPool2d):
            size = child.output_size
            size = (size, size) if isinstance(size, int) else tuple(size)
            if size != (1, 1):
                setattr(model, name, ExportAdaptiveAvgPool2d(size))
                count += 1
                continue
        count += _swap_adaptive_pools(child)
    return count


def build_export_module(model: nn.Module, dynamic_hw: bool = True) -> nn.Module:
    """The export wrapper for ``model`` (a copy: ``model`` is left as it is), in eval mode."""
    model = copy.deepcopy(model).eval()
    if dynamic_hw:
        _swap_adaptive_pools(model)
    if hasattr(model, 'rpn_head') or hasattr(model, 'roi_head'):
        wrapper = DetectorExport(model)
    elif hasattr(model, 'decode_head'):
        wrapper = SegmentorExport(model)
    elif hasattr(model, 'head') and hasattr(model, 'extract_feat'):
        wrapper = ClassifierExport(model)
    else:
        raise ExportError(f'{type(model).__name__}: exportable models are mmdet Faster/Mask R-CNN, mmseg '
                          'EncoderDecoder and mmpretrain ImageClassifier')
    return wrapper.eval()


# ------------------------------------------------------------------------------------ post-processing
def paste_masks(masks: np.ndarray, boxes: np.ndarray, height: int, width: int,
                threshold: Optional[float] = 0.5) -> np.ndarray:
    """Detection masks ``(N, M, M)`` on their boxes ``(N, 4)`` -> image masks ``(N, height, width)``.

    The bilinear resampling of mmdet's mask paste (``grid_sample``, ``align_corners=False``, zero
    outside the mask), in numpy for deployments without PyTorch. ``threshold=None`` returns the
    probabilities; otherwise booleans ``>= threshold`` (mmdet's ``mask_thr_binary``).
    """
    masks = np.asarray(masks, dtype=np.float32)
    boxes = np.asarray(boxes, dtype=np.float32)
    n, mh, mw = masks.shape
    out = np.zeros((n, height, width), dtype=np.float32)

    def weights(coords: np.ndarray, lo: float, hi: float, size: int) -> np.ndarray:
        # pixel centre -> normalised grid coordinate -> mask pixel coordinate (align_corners=False)
        span = hi - lo
        g = (coords - lo) / span * 2 - 1 if span != 0 else np.zeros_like(coords)
        pos = ((g + 1) * size - 1) / 2
        i0 = np.floor(pos).astype(np.int64)
        frac = (pos - i0).astype(np.float32)
        w = np.zeros((coords.size, size), dtype=np.float32)
        for idx, wt in ((i0, 1 - frac), (i0 + 1, frac)):
            ok = (idx >= 0) & (idx < size)
            w[np.nonzero(ok)[0], idx[ok]] += wt[ok]
        return w

    ys = np.arange(height, dtype=np.float32) + 0.5
    xs = np.arange(width, dtype=np.float32) + 0.5
    for k in range(n):
        x0, y0, x1, y1 = boxes[k]
        out[k] = weights(ys, y0, y1, mh) @ masks[k] @ weights(xs, x0, x1, mw).T
    return out if threshold is None else out >= threshold


# ------------------------------------------------------------------------------------ export
def _load_model(config, checkpoint: Optional[str], cfg_options: Optional[dict]):
    from mmengine.config import Config

    from .apis import build_model, load_config
    cfg = config if isinstance(config, Config) else load_config(config, cfg_options)
    model = build_model(cfg)
    if checkpoint is not None:
        from mmengine.runner import load_checkpoint
        load_checkpoint(model, checkpoint, map_location='cpu', strict=True)
    return model.eval(), cfg


def _flatten(out) -> List[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def export_onnx(model: Union[nn.Module, str, Any], output: str, checkpoint: Optional[str] = None,
                input_shape: Tuple[int, int, int, int] = (1, 3, 320, 320), opset: int = 17,
                dynamic_batch: bool = True, dynamic_hw: bool = True, verify: bool = True,
                verify_inputs: Optional[Sequence[torch.Tensor]] = None, cfg_options: Optional[dict] = None,
                temperature: Optional[float] = None, seed: int = 0) -> Dict[str, Any]:
    """Export ``model`` (a built mmdet / mmseg / mmpretrain model, or a config path / ``Config`` with
    an optional ``checkpoint``) to the ONNX file ``output``.

    Args:
        input_shape: the ``(B, 3, H, W)`` of the example input that is traced (random values). With a
            dynamic height and width, mmdet / mmseg models want multiples of 32 (their feature strides).
        opset: ONNX opset (>= 11; detectors >= 16).
        dynamic_batch / dynamic_hw: which input axes stay free in the graph.
        verify: run the graph in onnxruntime on the example input and on ``verify_inputs`` and compare
            with PyTorch; an :class:`ExportError` says where they disagree. ``verify_inputs=None``: one
            random input with every dynamic axis changed (batch + 1, height and width + 32).
        temperature: set every dynamic layer's temperature first (``dynconv_mm.set_temperature``);
            ``None``: export the model's current temperatures.

    Returns:
        a report: ``output``, ``kind``, ``inputs``, ``outputs``, ``dynamic_axes``, ``opset``,
        ``size_mb`` and, with ``verify``, ``checks`` (one per input: shape and largest differences).
    """
    if not isinstance(model, nn.Module):
        model, _ = _load_model(model, checkpoint, cfg_options)
    elif checkpoint is not None:
        from mmengine.runner import load_checkpoint
        load_checkpoint(model, checkpoint, map_location='cpu', strict=True)
    if temperature is not None:
        from .layers import set_temperature
        set_temperature(model, temperature)
    wrapper = build_export_module(model, dynamic_hw=dynamic_hw)
    kind = {DetectorExport: 'detector', SegmentorExport: 'segmentor', ClassifierExport: 'classifier'}[type(wrapper)]
    if opset < MIN_OPSET or (kind == 'detector' and opset < DETECTOR_MIN_OPSET):
        need = DETECTOR_MIN_OPSET if kind == 'detector' else MIN_OPSET
        raise ExportError(f'opset {opset} is too old for a {kind}: use opset {need} or newer'
                          + (' (ONNX RoiAlign has the aligned / half-pixel mode from opset 16)'
                             if kind == 'detector' else ''))
    if len(input_shape) != 4 or input_shape[1] != 3:
        raise ExportError(f'input_shape must be (B, 3, H, W), got {tuple(input_shape)}')
    g = torch.Generator().manual_seed(seed)
    example = torch.randn(*input_shape, generator=g)
    names = list(wrapper.output_names)
    axes: Dict[str, Dict[int, str]] = {'input': {}}
    if dynamic_batch:
        axes['input'][0] = 'batch'
    if dynamic_hw:
        axes['input'].update({2: 'height', 3: 'width'})
    for n in names:
        axes[n] = {0: 'batch'} if dynamic_batch else {}
        if dynamic_hw and kind == 'segmentor':
            axes[n].update({2: 'height', 3: 'width'})
    axes = {k: v for k, v in axes.items() if v}
    os.makedirs(osp.dirname(osp.abspath(output)), exist_ok=True)
    import warnings
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
        torch.onnx.export(wrapper, (example,), output, input_names=['input'], output_names=names,
                          dynamic_axes=axes or None, opset_version=opset, do_constant_folding=True,
                          **onnx_export_kwargs())
    report: Dict[str, Any] = dict(output=output, kind=kind, inputs=['input'], outputs=names, dynamic_axes=axes,
                                  opset=opset, size_mb=round(osp.getsize(output) / 2 ** 20, 2))
    if verify:
        if verify_inputs is None:
            b, _, h, w = input_shape
            other = (b + int(dynamic_batch), 3, h + 32 * int(dynamic_hw), w + 32 * int(dynamic_hw))
            verify_inputs = [torch.randn(*other, generator=g)] if other != tuple(input_shape) else []
        report['checks'] = [compare_with_onnxruntime(wrapper, output, x) for x in [example, *verify_inputs]]
    return report


def compare_with_onnxruntime(wrapper: nn.Module, onnx_path: str, x: torch.Tensor,
                             rtol: float = 1e-4) -> Dict[str, Any]:
    """Run ``x`` through ``wrapper`` and the ONNX file; raise :class:`ExportError` past ``rtol`` (of
    each output's largest magnitude) or when a detector keeps other detections."""
    import onnxruntime as ort
    sess = ort.InferenceSession(onnx_path, providers=['CPUExecutionProvider'])
    with torch.no_grad():
        ref = [t.numpy() for t in _flatten(wrapper(x))]
    got = sess.run(None, {'input': x.numpy()})
    names = [o.name for o in sess.get_outputs()]
    check: Dict[str, Any] = dict(shape=tuple(x.shape))
    for name, r, o in zip(names, ref, got):
        if r.shape != o.shape:
            raise ExportError(f'{name}: onnxruntime gives shape {o.shape}, PyTorch {r.shape} for input '
                              f'{tuple(x.shape)}')
        if r.dtype.kind in 'iub':
            bad = int((r != o).sum())
            check[f'{name}_mismatches'] = bad
            if bad:
                raise ExportError(f'{name}: {bad} entries differ between onnxruntime and PyTorch for input '
                                  f'{tuple(x.shape)} (a different set of detections)')
            continue
        diff = float(np.abs(r.astype(np.float64) - o).max()) if r.size else 0.0
        scale = float(np.abs(r).max()) if r.size else 0.0
        check[f'{name}_max_abs'] = diff
        if diff > rtol * max(scale, 1.0):
            raise ExportError(f'{name}: onnxruntime and PyTorch differ by {diff:.3g} (largest value {scale:.3g}) for '
                              f'input {tuple(x.shape)}')
    return check
