"""Training from every entry point: tools/train.py and ``mim train dynconv_mm``."""
import os
import os.path as osp
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import cpu_subprocess_env

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TINY = osp.join(ROOT, 'tests', 'data', 'configs', 'mmpretrain_tiny_folder.py')


@pytest.fixture
def image_folder(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for c, name in enumerate(['cat', 'dog']):
        os.makedirs(tmp_path / 'imgs' / name)
        for i in range(3):
            arr = (rng.random((40, 48, 3)) * 120 + 100 * c).astype('uint8')
            Image.fromarray(arr).save(tmp_path / 'imgs' / name / f'{i}.jpg')
    return str(tmp_path / 'imgs')


def _run(cmd, cwd, env=None):
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def test_tools_train_runs(image_folder, tmp_path):
    work = tmp_path / 'work'
    _run([sys.executable, osp.join(ROOT, 'tools', 'train.py'), TINY, '--work-dir', str(work), '--device', 'cpu',
          '--cfg-options', f'train_dataloader.dataset.data_root={image_folder}'], ROOT)
    assert (work / 'epoch_1.pth').exists()


def test_mim_train_resolves_and_runs(image_folder, tmp_path):
    mim = shutil.which('mim', path=osp.dirname(sys.executable))
    if mim is None:
        pytest.skip('openmim is not installed')
    import dynconv_mm
    mim_dir = osp.join(osp.dirname(dynconv_mm.__file__), '.mim')
    assert osp.isfile(osp.join(mim_dir, 'tools', 'train.py')), 'dynconv_mm/.mim/tools missing: reinstall'
    assert osp.isdir(osp.join(mim_dir, 'configs'))
    work = tmp_path / 'mim_work'
    log = _run([mim, 'train', 'dynconv_mm', TINY, '--work-dir', str(work),
                '--cfg-options', f'train_dataloader.dataset.data_root={image_folder}'], str(tmp_path),
               env=cpu_subprocess_env())
    assert (work / 'epoch_1.pth').exists(), log[-2000:]
