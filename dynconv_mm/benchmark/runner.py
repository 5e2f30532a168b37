"""Run the benchmark: for every case, ours vs the official-style reference vs the static twin.

Measurements per case (float32 unless ``amp``):

* ``train``: one training step (forward in train mode, ``sum`` of the last output, backward, grads
  reset to ``None`` before each step) at the training batch size;
* ``fwd``: an inference forward (eval mode, ``no_grad``) at the training batch size;
* ``fwd1``: the same at batch size 1.

Variants: ``ours`` (the layers as they are), ``reference`` (official-style forwards swapped in with
:func:`~dynconv_mm.benchmark.reference.use_reference` on a copy of ours with row-major warehouses, same
weights), ``twin`` (plain static convolutions of the same shapes), and optionally ``ours+compile``
(``torch.compile``) and ``ours+bf16`` (bf16 autocast). The variants of a case are timed in interleaved
rounds (:func:`~dynconv_mm.benchmark.timing.measure_interleaved`) and ratios are computed from their
medians, so drifts of the machine during a run affect all of them alike.
"""
from __future__ import annotations

import contextlib
import copy
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..analysis.dynamic_flops import count_macs as count_layer_macs
from ..analysis.dynamic_flops import protocol_layers
from ..layers.kernel_warehouse import release_kernel_buffers
from .cases import BenchmarkCase
from .macs import count_macs, time_kernel_sections
from .reference import count_dynamic_layers, use_reference
from .timing import keep_freed_memory, measure_interleaved, measure_peak_memory, measure_time, read_bandwidth

__all__ = ['BenchmarkOptions', 'CaseResult', 'run_case', 'run_benchmark', 'environment', 'max_rel_diff',
           'assembly_floor_time', 'mixed_parameter_reads']


@dataclass
class BenchmarkOptions:
    device: str = 'cpu'
    quick: bool = False
    repeats: int = 5
    warmup: int = 1
    min_time: float = 0.0
    train_batch: Optional[int] = None
    size: Optional[int] = None
    compile: bool = False
    amp: bool = False
    memory: bool = True
    sweep: Sequence[int] = ()
    sweep_models: bool = False
    threads: Optional[int] = None
    malloc: str = 'default'  # 'keep': glibc keeps freed memory (see timing.keep_freed_memory)


@dataclass
class CaseResult:
    name: str
    kind: str
    note: str
    size: int
    train_batch: int
    times: Dict[str, Dict[str, float]] = field(default_factory=dict)     # variant -> mode -> median s
    min_times: Dict[str, Dict[str, float]] = field(default_factory=dict)  # variant -> mode -> fastest s
    spread: Dict[str, Dict[str, float]] = field(default_factory=dict)    # variant -> mode -> iqr s
    memory: Dict[str, Dict[str, int]] = field(default_factory=dict)      # variant -> mode -> bytes
    ratios: Dict[str, Dict[str, float]] = field(default_factory=dict)    # 'ours/twin', 'ref/ours' -> mode
    macs: Dict[str, int] = field(default_factory=dict)
    floor: Dict[str, float] = field(default_factory=dict)
    sweep: Dict[str, Dict[str, float]] = field(default_factory=dict)    # variant -> batch -> median s
    max_rel_diff: Optional[float] = None
    errors: Dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def environment(options: BenchmarkOptions) -> Dict[str, Any]:
    """Where and how the numbers were taken."""
    import os
    env: Dict[str, Any] = dict(torch=torch.__version__, python=platform.python_version(),
                               machine=platform.machine(), processor=platform.processor(),
                               threads=torch.get_num_threads(), cpus=os.cpu_count(), device=options.device,
                               time=time.strftime('%Y-%m-%d %H:%M:%S %Z'), malloc=options.malloc)
    try:
        env['load_avg'] = os.getloadavg()
    except OSError:
        pass
    if options.device.startswith('cuda'):
        env['gpu'] = torch.cuda.get_device_name()
    from ..layers.native import native_status
    env['native'] = native_status()
    return env


def _last(out: Any) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[-1]
    return out


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|``."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def _reset_grads(module: nn.Module) -> None:
    for p in module.parameters():
        p.grad = None


def _step_fns(module: nn.Module, x: torch.Tensor, amp: bool, device: str) -> Dict[str, Callable[[], Any]]:
    dev_type = 'cuda' if device.startswith('cuda') else 'cpu'

    def ctx():
        return torch.autocast(dev_type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()

    def train():
        module.train()
        _reset_grads(module)
        with ctx():
            out = _last(module(x))
        out.float().sum().backward()

    def fwd():
        module.eval()
        with torch.no_grad(), ctx():
            module(x)

    def fwd1():
        module.eval()
        with torch.no_grad(), ctx():
            module(x[:1])

    return dict(train=train, fwd=fwd, fwd1=fwd1)


def assembly_floor_time(module: nn.Module, batch: int, train: bool, device: str = 'cpu', repeats: int = 3) -> float:
    """Time of the bare kernel-assembly products of every dynamic layer of ``module`` (each layer's
    ``assembly_products``: one ``mm`` per product; with ``train`` also their two backward products)."""
    operands = []
    for _, layer in protocol_layers(module):
        for m, k, n in layer.assembly_products(batch):
            a = torch.randn(m, k, device=device, requires_grad=train)
            c = torch.randn(k, n, device=device, requires_grad=train)
            operands.append((a, c))
    if not operands:
        return 0.0

    def run():
        for a, c in operands:
            y = torch.mm(a, c)
            if train:
                torch.autograd.backward(y, torch.ones_like(y))
    return measure_time(run, device, warmup=1, repeats=repeats).median


def mixed_parameter_reads(module: nn.Module) -> int:
    """Bytes of parameters one forward pass of ``module`` mixes into kernels at the least (each
    layer's ``mixed_parameter_bytes``: a KW layer reads its whole warehouse once, at any batch size)."""
    return sum(layer.mixed_parameter_bytes() for _, layer in protocol_layers(module))


_BANDWIDTH: Dict[str, float] = {}


def _read_bandwidth(device: str) -> float:
    """The device's read bandwidth (bytes/s), measured once per process."""
    if device not in _BANDWIDTH:
        _BANDWIDTH[device] = read_bandwidth(device)
    return _BANDWIDTH[device]


def run_case(case: BenchmarkCase, options: BenchmarkOptions, log: Callable[[str], None] = print) -> CaseResult:
    """Measure one case (see the module docstring)."""
    device = options.device
    size = case.input_size(options.quick, options.size)
    batch = options.train_batch or (2 if options.quick else case.train_batch)
    result = CaseResult(case.name, case.kind, case.note, size, batch)
    ours = case.build().to(device)
    twin = case.build_twin().to(device)
    torch.manual_seed(1)
    x = torch.randn(batch, case.in_channels, size, size, device=device)
    modes = ('fwd', 'fwd1') if case.deploy else ('train', 'fwd', 'fwd1')
    n_dyn, _ = count_dynamic_layers(ours)
    with_ref = case.has_reference and n_dyn > 0

    # same outputs: ours vs the official-style reference (eval mode, float32)
    if with_ref:
        ours.eval()
        with torch.no_grad():
            y = _last(ours(x))
            with use_reference(ours):
                y_ref = _last(ours(x))
        result.max_rel_diff = max_rel_diff(y, y_ref)

    # every variant runs on its own module, its context entered for the whole case, so that the variants
    # can be timed in interleaved rounds (measure_interleaved): the reference on a copy whose dynamic
    # layers run the official-style forwards with row-major warehouses
    variants: List[tuple] = [('ours', ours, False), ('twin', twin, False)]
    stack = contextlib.ExitStack()
    if with_ref:
        ref_model = copy.deepcopy(ours)
        stack.enter_context(use_reference(ref_model, official_layout=True))
        variants.insert(1, ('reference', ref_model, False))
    if options.amp:
        variants.append(('ours+bf16', ours, True))
    if options.compile:
        variants.append(('ours+compile', torch.compile(copy.deepcopy(ours)), False))

    with stack:
        fns = {vname: _step_fns(module, x, amp, device) for vname, module, amp in variants}
        for vname, _, _ in variants:
            result.times[vname], result.spread[vname], result.memory[vname] = {}, {}, {}
            result.min_times[vname] = {}
        for mode in modes:
            live = {}
            for vname, _, _ in variants:  # a variant that fails (e.g. no bf16 kernels) is reported and dropped
                try:
                    fns[vname][mode]()
                except Exception as err:
                    result.errors[f'{vname}/{mode}'] = f'{type(err).__name__}: {err}'[:300]
                    continue
                live[vname] = fns[vname][mode]
            for vname, t in measure_interleaved(live, device, options.warmup, options.repeats,
                                                options.min_time).items():
                result.times[vname][mode] = t.median
                result.spread[vname][mode] = t.iqr
                result.min_times[vname][mode] = t.min
        for vname, module, _ in variants:
            if options.memory and vname in ('ours', 'reference', 'twin'):
                for mode in ('train', 'fwd1'):
                    if mode in result.times[vname]:
                        release_kernel_buffers(module)  # count the kernels' memory as a first step does
                        result.memory[vname][mode] = measure_peak_memory(fns[vname][mode], device)
            if options.sweep and (case.kind == 'layer' or options.sweep_models) and vname in (
                    'ours', 'reference', 'twin'):
                result.sweep[vname] = {}
                module.eval()
                for b in options.sweep:
                    xb = torch.randn(b, case.in_channels, size, size, device=device)

                    def fwd_b(xb=xb, module=module):
                        with torch.no_grad():
                            module(xb)
                    result.sweep[vname][str(b)] = measure_time(fwd_b, device, options.warmup, options.repeats,
                                                               options.min_time).median
            log(f'  {case.name} {vname}: ' + ', '.join(f'{m} {v * 1e3:.1f} ms'
                                                        for m, v in result.times[vname].items()))

    for mode in modes:
        t_ours = result.times['ours'].get(mode)
        t_twin = result.times['twin'].get(mode)
        if t_ours and t_twin:
            result.ratios.setdefault('ours/twin', {})[mode] = t_ours / t_twin
        if with_ref and t_ours and result.times['reference'].get(mode):
            result.ratios.setdefault('reference/ours', {})[mode] = result.times['reference'][mode] / t_ours

    # analytic MACs and the distance from the floor
    ours.eval()
    result.macs = count_macs(ours, x[:1])
    if result.macs['conv']:
        result.floor['arithmetic_ratio'] = (result.macs['conv'] + result.macs['assembly']) / result.macs['conv']
        if 'ours/twin' in result.ratios and 'fwd' in result.ratios['ours/twin']:
            result.floor['fwd_vs_arithmetic'] = result.ratios['ours/twin']['fwd'] / result.floor['arithmetic_ratio']
    if any(layer.splits_forward for _, layer in protocol_layers(ours)):
        with time_kernel_sections(ours, device) as sections:
            with torch.no_grad():
                ours(x)
        if sections['assembly'] > 0:
            result.floor['assembly_gmacs'] = result.macs['assembly'] * batch / sections['assembly'] / 1e9
        if sections['conv'] > 0:
            with torch.no_grad():  # conv MACs of the splitting layers only
                split = count_layer_macs(ours, x[:1]).per_layer
                conv = sum(c for path, (_, c, _, _) in split.items()
                           if ours.get_submodule(path).splits_forward) if split else 0
            result.floor['kw_conv_gmacs'] = conv * batch / sections['conv'] / 1e9
        for mode, train in (('fwd', False), ('train', True)):
            if mode in result.times['ours'] and mode in result.times['twin']:
                floor_t = result.times['twin'][mode] + assembly_floor_time(ours, batch, train, device,
                                                                           max(1, options.repeats // 2))
                result.floor[f'{mode}_vs_floor'] = result.times['ours'][mode] / floor_t
        # the bandwidth floor: the twin's time plus reading every layer's warehouse once at the
        # machine's read bandwidth
        reads = mixed_parameter_reads(ours)
        if reads:
            bandwidth = _read_bandwidth(device)
            result.floor['warehouse_mb'] = reads / 2 ** 20
            result.floor['read_gbps'] = bandwidth / 1e9
            for mode in ('fwd', 'fwd1'):
                if mode in result.times['ours'] and mode in result.times['twin']:
                    bw_floor = result.times['twin'][mode] + reads / bandwidth
                    result.floor[f'{mode}_vs_bw_floor'] = result.times['ours'][mode] / bw_floor
    return result


def run_benchmark(cases: Sequence[BenchmarkCase], options: BenchmarkOptions,
                  log: Callable[[str], None] = print,
                  on_result: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Run every case; returns ``{'environment', 'options', 'results'}`` (JSON-serialisable).
    ``on_result`` receives that dict after every case (to write partial reports)."""
    if options.malloc not in ('default', 'keep'):
        raise ValueError(f"malloc must be 'default' or 'keep', got {options.malloc!r}")
    if options.malloc == 'keep' and not keep_freed_memory():
        raise RuntimeError("malloc='keep' needs glibc (mallopt); this C library is not glibc")
    if options.threads:
        torch.set_num_threads(options.threads)
    results = []
    for case in cases:
        log(f'[{case.kind}] {case.name}')
        try:
            results.append(run_case(case, options, log).to_dict())
        except Exception as err:  # one broken case must not lose the others' numbers
            log(f'  FAILED: {type(err).__name__}: {err}')
            results.append(dict(name=case.name, kind=case.kind, note=case.note,
                                errors={'case': f'{type(err).__name__}: {err}'[:500]}))
        if on_result is not None:
            on_result(dict(environment=environment(options), options=asdict(options), results=list(results)))
    return dict(environment=environment(options), options=asdict(options), results=results)
