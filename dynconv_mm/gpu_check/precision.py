"""Numerical settings shared by the parts: TF32, relative differences, autocast contexts."""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional

import torch

__all__ = ['tf32', 'rel_diff', 'grad_diffs', 'total_grad_diff', 'autocast', 'DTYPES']

DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16}


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 for CUDA matrix products and cuDNN convolutions on or off (restored after).

    PyTorch's defaults differ between the two (cuDNN convolutions use TF32 unless told not to), so a
    float32 comparison must switch both. No effect on the CPU."""
    precision = 'tf32' if enabled else 'ieee'
    matmul, conv = torch.backends.cuda.matmul, getattr(torch.backends.cudnn, 'conv', None)
    if hasattr(matmul, 'fp32_precision') and conv is not None and hasattr(conv, 'fp32_precision'):
        saved = matmul.fp32_precision, conv.fp32_precision
        matmul.fp32_precision, conv.fp32_precision = precision, precision
        try:
            yield
        finally:
            matmul.fp32_precision, conv.fp32_precision = saved
    else:  # older torch: the allow_tf32 flags
        saved = matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
        try:
            yield
        finally:
            matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def rel_diff(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> float:
    """``max|a - b| / max|b|`` in float64 (0 for two all-zero tensors; inf where only one side has a value)."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else float('inf')
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape:
        return float('inf')
    scale = b.abs().max()
    diff = (a - b).abs().max()
    if scale == 0:
        return 0.0 if diff == 0 else float('inf')
    return float(diff / scale)


#: a gradient whose norm is below this fraction of the largest gradient norm of its model is compared
#: against that floor (the gradient of a conv bias followed by batch norm is zero up to rounding)
GRAD_FLOOR = 1e-3


def grad_diffs(grads: Dict[str, Optional[torch.Tensor]], ref: Dict[str, Optional[torch.Tensor]]) -> Dict[str, float]:
    """``||g - g_ref|| / max(||g_ref||, GRAD_FLOOR * largest ||g_ref||)`` per name (L2 norms, float64).

    Gradients are compared by norm rather than by their largest entry: where a ReLU's input is within
    rounding of zero, the two computations may take different sides, and one entry of the gradient then
    differs by its full size; the norm counts that entry as the one entry it is."""
    norms = {k: float(v.detach().double().norm()) for k, v in ref.items() if v is not None}
    floor = GRAD_FLOOR * max(norms.values(), default=0.0)
    out = {}
    for key in sorted(set(grads) | set(ref)):
        a, b = grads.get(key), ref.get(key)
        if a is None or b is None:
            out[key] = 0.0 if a is None and b is None else float('inf')
            continue
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        if a.shape != b.shape:
            out[key] = float('inf')
            continue
        diff = float((a - b).norm())
        scale = max(norms[key], floor)
        out[key] = (0.0 if diff == 0 else float('inf')) if scale == 0 else diff / scale
    return out


def total_grad_diff(grads: Dict[str, Optional[torch.Tensor]], ref: Dict[str, Optional[torch.Tensor]]) -> float:
    """``||g - g_ref|| / ||g_ref||`` of all gradients taken as one vector (names of both sides must agree).

    The check for low precisions (float16, bfloat16, TF32): there a ReLU inside a layer may flip for an
    input near zero, and a small tensor (a bias of four entries) then differs a lot from its float32
    gradient, while the gradient as a whole is right."""
    if set(grads) != set(ref) or any((grads[k] is None) != (ref[k] is None) for k in ref):
        return float('inf')
    diff = total = 0.0
    for key, b in ref.items():
        if b is None:
            continue
        a, b = grads[key].detach().double().cpu(), b.detach().double().cpu()
        if a.shape != b.shape:
            return float('inf')
        diff += float((a - b).square().sum())
        total += float(b.square().sum())
    if total == 0:
        return 0.0 if diff == 0 else float('inf')
    return (diff / total) ** 0.5


def autocast(device: str, precision: str):
    """``torch.autocast`` for ``'fp16'`` / ``'bf16'``; a null context for ``'fp32'``."""
    if precision == 'fp32':
        return contextlib.nullcontext()
    return torch.autocast('cuda' if device.startswith('cuda') else 'cpu', dtype=DTYPES[precision])
