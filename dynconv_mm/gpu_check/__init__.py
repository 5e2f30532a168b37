"""The GPU check: one command that measures, on one GPU in at most ten minutes, what dynconv_mm has
never been run on (``tools/gpu_check.py``; ``docs/benchmark.md``, "GPU check").

Parts (each in its own process, under its own time budget; :data:`PARTS`):

* ``environment``: GPU, CUDA, cuDNN, NCCL and library versions; mmcv's RoIAlign and nms on CUDA;
* ``native_spy``: the native CPU kernels are never entered for CUDA tensors;
* ``parity``: every registered layer, CPU against CUDA, forward and gradients; ``batched_conv`` forms;
* ``amp``: an fp16 (gradient scaler) and a bf16 training step for every published backbone;
* ``microbench``: the ``batched_conv`` forms timed, i.e. what ``'auto'`` should pick on CUDA;
* ``benchmark``: ``tools/benchmark/benchmark.py`` on CUDA at training sizes;
* ``ddp``: one-GPU ``torchrun`` training (NCCL, ``MMDistributedDataParallel``);
* ``compile``: ``torch.compile`` graph breaks, recompiles and results.

``dry_run=True`` runs every part on the CPU at tiny sizes, skipping (and saying so) only what needs
CUDA, so that the check is exercised by the test suite long before a GPU runs it.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

from .core import SCHEMA, STATUSES, Part, PartContext, validate_report, write_reports

__all__ = ['PARTS', 'TIME_LIMIT_S', 'SCHEMA', 'STATUSES', 'Part', 'PartContext', 'select_parts', 'run_check',
           'validate_report', 'write_reports']

_P = 'dynconv_mm.gpu_check.'
PARTS: List[Part] = [
    Part('environment', 'Environment and mmcv CUDA ops', _P + 'environment:run', 20, 30,
         'GPU name and capability, CUDA, cuDNN and NCCL versions; mmcv RoIAlign and nms on CUDA tensors '
         'against the CPU'),
    Part('native_spy', 'Native CPU kernels never entered for CUDA tensors', _P + 'layer_checks:run_spy', 30, 40,
         'calls of the native entry points and compiled kernels while every layer host and two backbones '
         'run on CUDA in train, eval, no_grad and inference_mode (the CPU run is the control)'),
    Part('parity', 'CPU vs CUDA parity of every registered layer', _P + 'layer_checks:run_parity', 45, 60,
         'forward and gradients at batch 1 and 3, float32 with TF32 off (rel 1e-5) and on (rel 1e-2); every '
         'batched_conv form against a float64 loop'),
    Part('amp', 'fp16 (GradScaler) and bf16 steps of the published backbones', _P + 'amp:run', 50, 60,
         'finite loss and gradients, backbone output within 2e-2 of float32, batch 32 at 224 px, reduced width'),
    Part('microbench', 'batched_conv forms: what auto should pick on CUDA', _P + 'microbench:run', 60, 30,
         'grouped / matmul / unfold for 1x1, 3x3 and 7x7 depth-wise kernels, batch 32 and 64, float32 TF32 '
         'off and on, fp16, cudnn.benchmark off and on: time and peak memory'),
    Part('benchmark', 'Project benchmark on CUDA at training sizes', _P + 'runs:run_benchmark', 130, 90,
         'tools/benchmark/benchmark.py --device cuda --train-batch 64 --size 224 --amp for KW-ResNet-50 1x '
         'and 4x, dynamic DWNet-T and every layer, against the reference and the static twin'),
    Part('ddp', 'One-GPU torchrun DDP smoke runs', _P + 'runs:run_ddp', 55, 90,
         'tools/train.py --launcher pytorch under torchrun for the quick-start classifier and a PEDConv '
         'config: NCCL, MMDistributedDataParallel, no unused-parameter error'),
    Part('compile', 'torch.compile (inductor): graph breaks and recompiles', _P + 'compile_check:run', 140, 300,
         'training step and eval forward of KW-ResNet-50, PEDConv ResNet-18 with its auxiliary loss and '
         'dynamic DWNet-T at two input sizes'),
]
#: the whole check on one GPU, part budgets and process start-ups included (one device call is 10 min)
TIME_LIMIT_S = 570.0


def select_parts(names: Optional[Sequence[str]] = None) -> List[Part]:
    """The parts named (in check order), all for ``None``; ``ValueError`` lists the known names."""
    if not names:
        return list(PARTS)
    known = [p.name for p in PARTS]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f'unknown GPU check parts {unknown}; known: {known}')
    return [p for p in PARTS if p.name in names]


def run_check(out_dir: str, dry_run: bool = False, parts: Optional[Sequence[str]] = None,
              device: Optional[str] = None, time_limit: Optional[float] = None,
              log: Callable[[str], None] = print, budget_scale: float = 1.0) -> Dict[str, Any]:
    """Run the check into ``out_dir`` (``report.md``, ``report.json``, one folder and log per part).

    ``device``: default ``'cuda'`` (``'cpu'`` in the dry run); a real run without CUDA is an error.
    ``time_limit``: seconds for the whole check (default :data:`TIME_LIMIT_S` on a GPU, none in the
    dry run). ``budget_scale``: every part's budget times this (a slower GPU, or a dry run on a busy
    CPU, where the budgets only guard against a hang). Returns the report's data (``data['ok']``:
    every part passed or was skipped)."""
    import torch

    from .core import run_parts
    selected = select_parts(parts)
    if dry_run:
        device = 'cpu'
    else:
        device = device or 'cuda'
        if not device.startswith('cuda'):
            raise ValueError(f"the GPU check runs on a CUDA device (got {device!r}); use dry_run=True for the CPU")
        if not torch.cuda.is_available():
            raise RuntimeError('no CUDA device here (torch.cuda.is_available() is False): run the dry run '
                               '(tools/gpu_check.py --dry-run) to check on the CPU')
        if time_limit is None:
            time_limit = TIME_LIMIT_S
    data = run_parts(selected, out_dir, device, dry_run, time_limit, log, budget_scale=budget_scale)
    write_reports(data, out_dir)
    return data
