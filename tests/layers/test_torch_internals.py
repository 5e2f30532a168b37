"""The one module that touches private torch internals: probed, and with a fallback that changes no
result. The KernelWarehouse tests also run with every internal switched off."""
import inspect
import os
import subprocess
import sys

import pytest
import torch

from dynconv_mm.benchmark import KWLayerBlock
from dynconv_mm.layers import torch_internals
from dynconv_mm.layers.kernel_warehouse import cpu_backend

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_forcing_the_fallback_switches_every_internal_off():
    with torch_internals.force_fallback():
        assert not torch_internals.memory_reuse_supported()
        assert not torch_internals.gradient_sink_supported()
        assert torch_internals.storage_use_count(torch.empty(3)) is None
        assert torch_internals.graph_task_id() is None
        assert torch_internals.has_global_module_hooks()  # cannot tell: callers keep to the modules' path
        assert torch_internals.internals_status().startswith('off')


def test_probes_on_this_torch():
    """Where an internal exists, its probe must accept it here (a probe that refuses a working internal
    would make the fast path silently slower); the answers are those of the internals themselves."""
    if hasattr(torch._C, '_storage_Use_Count'):
        assert torch_internals.memory_reuse_supported()
        t = torch.empty(4)
        n = torch_internals.storage_use_count(t)
        v = t.view(2, 2)
        assert torch_internals.storage_use_count(t) == n + 1
        del v
    if hasattr(torch._C, '_current_graph_task_id') and hasattr(torch._C, '_will_engine_execute_node'):
        assert torch_internals.gradient_sink_supported()
        assert torch_internals.graph_task_id() == -1  # outside a backward call
    assert not torch_internals.has_global_module_hooks()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        assert torch_internals.has_global_module_hooks()
    finally:
        handle.remove()


def test_a_broken_internal_is_not_used(monkeypatch):
    """An internal that changed its behaviour fails its probe, and the callers fall back."""
    monkeypatch.setattr(torch_internals, '_probes', {})
    monkeypatch.setattr(torch._C, '_storage_Use_Count', lambda cdata: 1, raising=False)
    assert not torch_internals.memory_reuse_supported()
    memory = cpu_backend.ReusableMemory()
    a = memory.take((4,), torch.empty(1))
    b = memory.take((4,), torch.empty(1))
    assert a.data_ptr() != b.data_ptr()  # both alive: separate memory, nothing handed out twice


@pytest.mark.parametrize('batch', [1, 3])
def test_fallback_gives_the_same_values_and_gradients(monkeypatch, batch):
    monkeypatch.setattr(cpu_backend, 'BLOCKED_ASSEMBLY_MIN_CELLS', 0)  # the CPU backend on a small layer
    results = []
    for off in (False, True):
        torch.manual_seed(0)
        block = KWLayerBlock(8, 16, 3, 1.0, padding=1)
        block.train()
        x = torch.randn(batch, 8, 6, 6, requires_grad=True)
        with torch_internals.force_fallback(off):
            y = block(x)
            y.square().sum().backward()
        results.append((y.detach(), x.grad, block.warehouse_manager.weights[0].grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_kernel_warehouse_tests_pass_with_every_internal_off():
    """The KW layer, assembly and native-kernel tests, run through the fallback paths."""
    env = dict(os.environ, DYNCONV_MM_TORCH_INTERNALS='0', PYTHONDONTWRITEBYTECODE='1')
    files = ['tests/layers/test_kernel_warehouse.py', 'tests/layers/test_kw_blocked_assembly.py',
             'tests/layers/test_native.py']
    proc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-x', *files],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_onnx_export_kwargs_are_accepted_and_pick_the_torchscript_exporter():
    kwargs = torch_internals.onnx_export_kwargs()
    params = inspect.signature(torch.onnx.export).parameters
    assert set(kwargs) <= set(params)
    assert kwargs == ({'dynamo': False} if 'dynamo' in params else {})


def test_autocast_probe_follows_the_autocast_context():
    assert torch_internals.autocast_enabled('cpu') is False
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert torch_internals.autocast_enabled('cpu') is True
    assert torch_internals.autocast_enabled('cpu') is False


def test_weights_only_globals_admit_the_listed_classes_inside_the_block_only(tmp_path):
    import argparse
    path = str(tmp_path / 'ckpt.pth')
    torch.save({'state_dict': {'w': torch.zeros(2)}}, path)
    with torch_internals.weights_only_globals([argparse.Namespace]):
        assert torch.equal(torch.load(path, weights_only=True)['state_dict']['w'], torch.zeros(2))
    torch.save({'args': argparse.Namespace(a=1)}, path)
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)
    if hasattr(torch.serialization, 'safe_globals'):  # older releases cannot build such objects weights-only
        with torch_internals.weights_only_globals([argparse.Namespace]):
            assert torch.load(path, weights_only=True)['args'].a == 1
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)


@pytest.mark.skipif(not hasattr(torch.serialization, 'add_safe_globals'), reason='torch < 2.4 has no public allow-list')
def test_weights_only_globals_keep_what_was_allowed_before(tmp_path):
    """The block must not take back globals allowed outside it: importing dynconv_mm allow-lists
    mmengine's checkpoint classes, and a converter's load inside the block must leave later Runner
    checkpoint loads (plain ``torch.load``) working."""
    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer

    import dynconv_mm  # noqa: F401  (registers mmengine's checkpoint globals)
    from dynconv_mm.utils.checkpoint import mmengine_checkpoint_globals

    path = str(tmp_path / 'runner.pth')
    buf = HistoryBuffer()
    buf.update(1.5)
    torch.save({'message_hub': {'loss': buf, 'arr': np.arange(3)}}, path)
    assert torch.load(path, weights_only=True)['message_hub']['loss'].current() == 1.5
    with torch_internals.weights_only_globals(mmengine_checkpoint_globals()):
        torch.load(path, weights_only=True)
    # after the block: still allowed
    assert torch.load(path, weights_only=True)['message_hub']['arr'].tolist() == [0, 1, 2]
