"""The mmcv wheel cache of tools/setup_env.sh is keyed by what the wheel holds (tools/mmcv_build.py), a cached
wheel is taken only when its compiled library fits, and the installed mmcv is checked for CUDA ops where CUDA
is available. The GPU is faked: ``torch.cuda.is_available`` and mmcv's compiled-CUDA version are patched, so
this runs (and means the same) on machines with and without one."""
import importlib.util
import os.path as osp
import subprocess
import sys

import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
HELPER = osp.join(ROOT, 'tools', 'mmcv_build.py')


@pytest.fixture
def helper():
    spec = importlib.util.spec_from_file_location('mmcv_build', HELPER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cuda_torch(monkeypatch):
    """A CUDA 12.8 build of torch; ``set(available)`` fakes whether a GPU is there."""
    monkeypatch.setattr(torch.version, 'cuda', '12.8')
    monkeypatch.setattr(torch.version, 'hip', None)
    monkeypatch.delenv('FORCE_CUDA', raising=False)

    def set_available(available: bool):
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: available)
    return set_available


def test_key_tells_a_cpu_build_from_a_gpu_build(helper, cuda_torch, monkeypatch):
    base = f'torch{torch.__version__.split("+")[0]}-cp{sys.version_info[0]}{sys.version_info[1]}-cu128'
    cuda_torch(False)
    cpu_machine = helper.cache_key(with_ops=True)
    assert cpu_machine == f'{base}-cpuops'
    assert helper.cache_key(with_ops=False) == f'{base}-noops'
    cuda_torch(True)
    gpu_machine = helper.cache_key(with_ops=True)
    assert gpu_machine == f'{base}-cudaops' != cpu_machine  # a CPU-machine wheel is never found on a GPU machine
    cuda_torch(False)
    monkeypatch.setenv('FORCE_CUDA', '1')  # mmcv's setup.py then compiles the CUDA kernels without a GPU
    assert helper.cache_key(with_ops=True) == gpu_machine


def test_key_of_cpu_and_rocm_torch(helper, monkeypatch):
    monkeypatch.setattr(torch.version, 'cuda', None)
    monkeypatch.setattr(torch.version, 'hip', None)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert helper.cache_key(with_ops=True).endswith('-cpu-cpuops')
    monkeypatch.setattr(torch.version, 'hip', '6.2.41133-dd7f95766')
    assert helper.cache_key(with_ops=True).endswith('-rocm6.2-cudaops')


def test_check_refuses_cpu_only_ops_where_cuda_is_available(helper, cuda_torch, monkeypatch):
    import mmcv
    ops = pytest.importorskip('mmcv.ops', reason='mmcv was built without its ops')
    cuda_torch(True)
    monkeypatch.setattr(ops, 'get_compiling_cuda_version', lambda: 'not available')
    with pytest.raises(RuntimeError, match='built without CUDA'):
        helper.check_mmcv(mmcv.__version__, with_ops=True)
    # ops compiled with CUDA pass when nms runs on the GPU (faked here), and fail when it does not
    monkeypatch.setattr(ops, 'get_compiling_cuda_version', lambda: '12.8')
    monkeypatch.setattr(helper, 'nms_on_cuda', lambda nms: [0, 2])
    assert 'with CUDA ops' in helper.check_mmcv(mmcv.__version__, with_ops=True)

    def broken(nms):
        raise RuntimeError('no kernel image is available for execution on the device')
    monkeypatch.setattr(helper, 'nms_on_cuda', broken)
    with pytest.raises(RuntimeError, match='nms fails on CUDA tensors.*no kernel image'):
        helper.check_mmcv(mmcv.__version__, with_ops=True)
    cuda_torch(False)  # without a GPU the CPU ops are what is wanted
    monkeypatch.setattr(ops, 'get_compiling_cuda_version', lambda: 'not available')
    assert 'with compiled ops' in helper.check_mmcv(mmcv.__version__, with_ops=True)


def test_check_version_and_missing_ops(helper, monkeypatch):
    import mmcv
    with pytest.raises(RuntimeError, match=f'mmcv {mmcv.__version__} is installed, 2.0.1 is wanted'):
        helper.check_mmcv('2.0.1', with_ops=False)
    assert 'without compiled ops' in helper.check_mmcv(mmcv.__version__, with_ops=False)
    monkeypatch.setitem(sys.modules, 'mmcv.ops', None)  # import mmcv.ops raises ImportError
    with pytest.raises(RuntimeError, match='has no compiled ops'):
        helper.check_mmcv(mmcv.__version__, with_ops=True)


def test_command_line_fails_with_the_reason_on_a_faked_gpu():
    """The call tools/setup_env.sh makes, in a process whose torch reports a GPU and whose mmcv ops lack CUDA."""
    import mmcv
    pytest.importorskip('mmcv.ops', reason='mmcv was built without its ops')
    fake = ("import sys, runpy, torch, mmcv.ops\n"
            "torch.cuda.is_available = lambda: True\n"
            "mmcv.ops.get_compiling_cuda_version = lambda: 'not available'\n"
            f"sys.argv = [{HELPER!r}, 'check', '--version', {mmcv.__version__!r}, '--ops', '1']\n"
            f"runpy.run_path({HELPER!r}, run_name='__main__')\n")
    p = subprocess.run([sys.executable, '-c', fake], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and 'mmcv check failed' in p.stderr and 'built without CUDA' in p.stderr, p.stderr


def _fake_wheel(folder, name, linked=None):
    """An mmcv wheel whose compiled library links ``linked`` (None: a wheel without compiled ops)."""
    import zipfile
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with zipfile.ZipFile(path, 'w') as z:
        z.writestr('mmcv/__init__.py', '')
        if linked is not None:
            z.writestr('mmcv/_ext.cpython-311-x86_64-linux-gnu.so', b'\x7fELF...libc10.so\0' + linked + b'\0...')
    return str(path)


def test_wheel_kind_is_read_from_what_the_library_links(helper, tmp_path):
    assert helper.wheel_ops_kind(_fake_wheel(tmp_path, 'a.whl')) == 'noops'
    assert helper.wheel_ops_kind(_fake_wheel(tmp_path, 'b.whl', b'libtorch_cpu.so')) == 'cpuops'
    assert helper.wheel_ops_kind(_fake_wheel(tmp_path, 'c.whl', b'libc10_cuda.so')) == 'cudaops'
    assert helper.wheel_ops_kind(_fake_wheel(tmp_path, 'd.whl', b'libcudart.so.12')) == 'cudaops'


def test_find_cached_takes_only_a_fitting_wheel(helper, cuda_torch, tmp_path):
    """The GPU machine does not take the CPU machine's wheel, even from the older torch+Python-only folder."""
    tp = f'torch{torch.__version__.split("+")[0]}-cp{sys.version_info[0]}{sys.version_info[1]}'
    whl = 'mmcv-2.1.0-cp311-cp311-linux_x86_64.whl'
    cuda_torch(False)
    cpu_wheel = _fake_wheel(tmp_path / f'{tp}-cu128-cpuops', whl, b'libtorch_cpu.so')
    assert helper.find_cached_wheel(str(tmp_path), '2.1.0', with_ops=True) == cpu_wheel
    assert helper.find_cached_wheel(str(tmp_path), '2.0.1', with_ops=True) is None
    cuda_torch(True)
    assert helper.find_cached_wheel(str(tmp_path), '2.1.0', with_ops=True) is None
    # older layout: a CPU-ops wheel there is not taken on the GPU machine; a CUDA-ops one is, into its keyed folder
    _fake_wheel(tmp_path / tp, whl, b'libtorch_cpu.so')
    assert helper.find_cached_wheel(str(tmp_path), '2.1.0', with_ops=True) is None
    _fake_wheel(tmp_path / tp, whl, b'libc10_cuda.so')
    adopted = helper.find_cached_wheel(str(tmp_path), '2.1.0', with_ops=True)
    assert adopted == str(tmp_path / f'{tp}-cu128-cudaops' / whl)
    assert helper.wheel_ops_kind(adopted) == 'cudaops'
    # a build without ops (mmcv-lite) is found in its own folder only
    assert helper.find_cached_wheel(str(tmp_path), '2.1.0', with_ops=False) is None
    lite = _fake_wheel(tmp_path / f'{tp}-cu128-noops', 'mmcv_lite-2.1.0-py2.py3-none-any.whl')
    assert helper.find_cached_wheel(str(tmp_path), '2.1.0', with_ops=False) == lite
