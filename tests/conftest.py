"""Shared test fixtures.

Reference fixtures made with the official implementations live in ``../shared/golden`` beside the
checkout (set ``DYNCONV_MM_SHARED`` to point elsewhere). Tests that need them skip, saying why,
when the folder is absent (a user's clone has none).
"""
import os
import os.path as osp

import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
SHARED = os.environ.get('DYNCONV_MM_SHARED', osp.join(osp.dirname(ROOT), 'shared'))
GOLDEN = osp.join(SHARED, 'golden')
DATA = osp.join(SHARED, 'data')


def shared_path(*parts: str) -> str:
    """Path under ../shared, or skip the test with the reason."""
    path = osp.join(SHARED, *parts)
    if not osp.exists(path):
        pytest.skip(f'{path} is absent: the reference fixtures/data in ../shared are not beside this '
                    'checkout (set DYNCONV_MM_SHARED to their folder to run this test)')
    return path


def small_loaders(cfg, batch: int = 2):
    """A training config cut to CPU-test sizes (in place): batches of at most ``batch``, no worker
    processes, a log line per iteration."""
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[key]['batch_size'] = min(cfg[key]['batch_size'], batch)
        cfg[key]['num_workers'] = 0
        cfg[key]['persistent_workers'] = False
    cfg.default_hooks.logger.interval = 1
    return cfg


def make_toy_root(root: str, sizes: dict) -> str:
    """The toy sets in ``root``: ``sizes`` maps each set (``coco``, ``ade``, ``imagenet``) to its
    (train, val) sizes (scenes for coco and ade, images per class for imagenet); returns ``root``."""
    from dynconv_mm.datasets.toy import make_toy_datasets
    for name, (n_train, n_val) in sizes.items():
        make_toy_datasets(root, only=[name], num_train=n_train, num_val=n_val, log=lambda *a: None)
    return root


def randomize_norms(model: torch.nn.Module, seed: int = 0, mean_scale: float = 0.1, affine: bool = False,
                    bias_scale: float = 0.1) -> torch.nn.Module:
    """Give every batch norm with running statistics non-trivial ones (mean ``N(0, mean_scale)``, variance
    in [0.5, 1.5)) and, with ``affine``, a weight in [0.5, 1.5) and a bias ``N(0, bias_scale)``, so that
    folding, conversions and exports are tested on a model that looks trained. Returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, torch.nn.modules.batchnorm._BatchNorm) or m.running_mean is None:
                continue
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * mean_scale)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if affine and m.affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * bias_scale)
    return model


def load_golden(name: str) -> dict:
    """Load ``../shared/golden/<name>`` (trusted fixture files), or skip."""
    return torch.load(shared_path('golden', name), map_location='cpu', weights_only=False)


@pytest.fixture
def golden():
    return load_golden


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def cpu_only(monkeypatch):
    """Run on the CPU also on a machine with a GPU: CUDA looks absent (``torch.cuda.is_available``) and
    mmengine puts models on the CPU (it chose CUDA when it was imported). For the tests that mean the
    CPU: Runners, ``nn.DataParallel``, the tools in-process. CUDA itself is covered by tools/gpu_check.py."""
    from dynconv_mm.apis import pin_device
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    previous = pin_device('cpu')
    yield
    pin_device(previous)


@pytest.fixture
def mocked_gpu_host(monkeypatch):
    """Device selection as on a machine with one GPU: ``torch.cuda.is_available()`` is true, one device,
    and mmengine has chosen CUDA. Nothing can run on CUDA here, so a test meaning the CPU fails as soon
    as anything reaches for the GPU (request it before ``cpu_only`` to check that fixture's pin)."""
    from dynconv_mm.apis import pin_device
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda *args: 'mocked GPU')
    previous = pin_device('cuda')
    yield
    pin_device(previous)


@pytest.fixture(params=['this machine', 'mocked GPU host'])
def cpu_on_any_host(request):
    """``cpu_only`` here and on a (mocked) machine with a GPU: a test requesting it checks that what
    it runs stays on the CPU where a GPU is present."""
    if request.param == 'mocked GPU host':
        request.getfixturevalue('mocked_gpu_host')
    request.getfixturevalue('cpu_only')
    return request.param


def cpu_subprocess_env(**extra: str) -> dict:
    """Environment for a subprocess that must run on the CPU on any machine (the tools read
    ``--device``; ``mim`` and others are kept off the GPU by hiding it)."""
    return dict(os.environ, CUDA_VISIBLE_DEVICES='', **extra)


@pytest.fixture(autouse=True)
def _isolate_default_scope():
    """Tests that build through a registry must not see another test's mmengine default scope."""
    from mmengine.registry import DefaultScope
    before = dict(DefaultScope._instance_dict)
    yield
    DefaultScope._instance_dict.clear()
    DefaultScope._instance_dict.update(before)


def float64_reference(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A copy of ``layer`` run in float64 without autograd: the reference for float32 fast paths
    (native kernels take float32 only, so the copy takes the PyTorch path)."""
    import copy
    with torch.no_grad():
        return copy.deepcopy(layer).double()(x.double())


def assert_matches_reference(out: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    """``out`` is float32 and within ``rel`` of ``ref``'s largest magnitude everywhere."""
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=rel * ref.abs().max().item())


def at_thread_counts(fn, counts=(1, 2, 3)) -> list:
    """``[fn() with torch.set_num_threads(n) for n in counts]``, restoring the thread count after."""
    threads = torch.get_num_threads()
    results = []
    try:
        for n in counts:
            torch.set_num_threads(n)
            results.append(fn())
    finally:
        torch.set_num_threads(threads)
    return results


# the native CPU kernels (dynconv_mm/layers/native.py)
@pytest.fixture
def lib():
    """The compiled native library; a machine without a C compiler skips (there the PyTorch paths run)."""
    from dynconv_mm.layers import native
    if native._compiler() is None:
        pytest.skip('no C compiler on this machine: the native kernels cannot be built')
    library = native.native_library()
    assert library is not None, native.native_status()  # a compiler is there: the build must work
    return library


@pytest.fixture
def native_calls(monkeypatch):
    """``watch(name) -> calls``: records, per call of ``native.<name>``, whether it computed a result
    (``False``: it declined)."""

    from dynconv_mm.layers import native

    def watch(name):
        calls = []
        original = getattr(native, name)

        def wrapped(*args, **kwargs):
            out = original(*args, **kwargs)
            calls.append(out is not None)
            return out

        monkeypatch.setattr(native, name, wrapped)
        return calls

    return watch
