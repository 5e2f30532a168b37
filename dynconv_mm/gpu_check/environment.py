"""Part ``environment``: the machine and the libraries, and mmcv's compiled ops on the device.

mmcv's ``RoIAlign`` and ``nms`` (what Mask R-CNN needs) run on CPU tensors and, on a GPU, on CUDA
tensors; the CUDA results must equal the CPU ones (nms: the same kept boxes; RoIAlign: within float32
rounding). An mmcv built without CUDA ops fails here with mmcv's own message.
"""
from __future__ import annotations

import platform

import torch

from .core import PartContext


def _versions() -> dict:
    import mmcv
    import mmengine

    import dynconv_mm
    from dynconv_mm.layers.native import native_status
    info = dict(python=platform.python_version(), torch=torch.__version__, torch_cuda_build=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                mmcv=mmcv.__version__, mmengine=mmengine.__version__, dynconv_mm=dynconv_mm.__version__,
                cpus=__import__('os').cpu_count(), cuda_available=torch.cuda.is_available(),
                native_kernels=native_status())
    try:
        from mmcv.ops import get_compiler_version, get_compiling_cuda_version
        info['mmcv_ops_cuda_build'] = get_compiling_cuda_version()
        info['mmcv_ops_compiler'] = get_compiler_version()
    except Exception as err:  # mmcv without compiled ops (mmcv-lite)
        info['mmcv_ops_cuda_build'] = f'unavailable ({type(err).__name__}: {err})'
    for lib in ('mmpretrain', 'mmdet', 'mmseg'):
        try:
            info[lib] = __import__(lib).__version__
        except Exception:
            info[lib] = None
    return info


def _gpu(index: int = 0) -> dict:
    props = torch.cuda.get_device_properties(index)
    info = dict(gpu=props.name, capability='.'.join(map(str, torch.cuda.get_device_capability(index))),
                gpu_memory_gib=round(props.total_memory / 2 ** 30, 1), gpus=torch.cuda.device_count(),
                bf16_supported=torch.cuda.is_bf16_supported())
    try:
        info['nccl'] = '.'.join(map(str, torch.cuda.nccl.version()))
    except Exception as err:
        info['nccl'] = f'unavailable ({type(err).__name__})'
    return info


def _rois(device: str):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 16, 32, 32, generator=g)
    xy = torch.rand(24, 2, generator=g) * 100
    wh = torch.rand(24, 2, generator=g) * 80 + 4
    rois = torch.cat([torch.randint(0, 2, (24, 1), generator=g).float(), xy, xy + wh], 1)
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(24, generator=g)
    return [t.to(device) for t in (feats, rois, boxes, scores)]


def _mmcv_ops(device: str):
    from mmcv.ops import RoIAlign, nms
    feats, rois, boxes, scores = _rois(device)
    aligned = RoIAlign((7, 7), spatial_scale=0.25, sampling_ratio=2, aligned=True)(feats, rois)
    _, keep = nms(boxes, scores, iou_threshold=0.5)
    return aligned.cpu(), keep.cpu()


def run(ctx: PartContext) -> None:
    info = _versions()
    if ctx.cuda:
        info.update(_gpu())
    else:
        ctx.cuda_only('GPU name, capability, memory, NCCL version')
    for key, value in info.items():
        ctx.row('versions', item=key, value=value)
    ctx.finding('versions', info)
    gpu = f'{info["gpu"]} (sm {info["capability"]}, {info["gpu_memory_gib"]} GiB)' if ctx.cuda else 'CPU only'
    ctx.finding('headline', f'{gpu}; torch {info["torch"]} (CUDA {info["torch_cuda_build"]}, cuDNN {info["cudnn"]}); '
                            f'mmcv {info["mmcv"]} (ops CUDA {info["mmcv_ops_cuda_build"]})')

    aligned_cpu, keep_cpu = _mmcv_ops('cpu')
    ctx.row('mmcv_ops', op='RoIAlign + nms', device='cpu', ok=bool(torch.isfinite(aligned_cpu).all()),
            detail=f'RoIAlign {tuple(aligned_cpu.shape)}, nms kept {keep_cpu.numel()} of 24 boxes')
    if ctx.cuda:
        try:
            aligned, keep = _mmcv_ops(ctx.device)
        except Exception as err:
            ctx.row('mmcv_ops', op='RoIAlign + nms', device=ctx.device, ok=False,
                    detail=f'{type(err).__name__}: {err}'[:300])
        else:
            rel = float((aligned - aligned_cpu).abs().max() / aligned_cpu.abs().max().clamp_min(1e-30))
            same = torch.equal(keep, keep_cpu)
            ctx.row('mmcv_ops', op='RoIAlign', device=ctx.device, ok=rel <= 1e-5,
                    detail=f'max rel diff vs CPU {rel:.2e}')
            ctx.row('mmcv_ops', op='nms', device=ctx.device, ok=same,
                    detail='same kept boxes as the CPU' if same else f'kept {keep.tolist()} vs CPU {keep_cpu.tolist()}')
    else:
        ctx.cuda_only('RoIAlign and nms on CUDA tensors')
    ctx.summary = ctx.findings['headline']
