"""Installing dynconv_mm keeps the user's stack.

The package declares ranges (requirements/runtime.txt), never the development pins of requirements.txt, and
no torch, torchvision or mmcv (mmcv is the ``mim`` extra, checked on import). A wheel built from the sdist
and the editable install are dry-run (``pip install --dry-run --report``) into prepared environments: this
venv, and bare venvs holding the metadata of what OpenMMLab users have (torch 2.1.2 with OpenMMLab's mmcv
2.1.0 or with mmcv-lite 2.1.0, torch 2.15.0 with numpy 2); pip must plan to install dynconv_mm and nothing
else. Nothing is installed; the index is not needed when the plan is right (the tests skip, saying so, if pip
cannot reach it when it tries).
"""
import email
import importlib.util
import json
import os
import os.path as osp
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from dynconv_mm import version

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
NETWORK_ERRORS = ('NewConnectionError', 'Network is unreachable', 'Temporary failure in name resolution',
                  'ConnectTimeout', 'ReadTimeout', 'ConnectionError')


def _setup_module():
    spec = importlib.util.spec_from_file_location('dynconv_mm_setup', osp.join(ROOT, 'setup.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself runs only under __main__
    return module


def _name(req: str) -> str:
    return re.split(r'[<>=!~;\[ ]', req, maxsplit=1)[0].lower()


def test_install_requires_are_ranges_without_torch_or_mmcv():
    core, extras = _setup_module().read_requirements()
    assert {_name(r) for r in core} == {'numpy', 'mmengine'}
    for req in core + extras['mim'] + extras['mmdet'] + extras['mmseg'] + extras['mmpretrain']:
        assert '==' not in req, f'{req}: a pin of the development stack, not a range'
    pins = {_name(line): line for line in open(osp.join(ROOT, 'requirements.txt')) if '==' in line.split('#')[0]}
    assert {'torch', 'torchvision', 'mmcv', 'mmengine'} <= set(pins)  # the pins stay, for tools/setup_env.sh
    assert [_name(r) for r in extras['mim']] == ['mmcv']


def test_the_import_check_uses_the_declared_ranges():
    core, extras = _setup_module().read_requirements()
    declared = {_name(r): r for r in core + extras['mim']}
    assert declared['mmcv'] == 'mmcv>={},<{}'.format(*version.MMCV_RANGE)
    assert declared['mmengine'] == 'mmengine>={},<{}'.format(*version.MMENGINE_RANGE)


def test_import_check_names_the_fix(monkeypatch):
    import mmcv
    monkeypatch.setattr(mmcv, '__version__', '2.2.0')
    with pytest.raises(ImportError, match=r'mmcv==2\.2\.0 is installed, but dynconv_mm needs mmcv>=2\.0\.0,<2\.2\.0'
                                          r'.*mim install'):
        version.check_openmmlab_versions()
    monkeypatch.setattr(mmcv, '__version__', '2.1.0')
    version.check_openmmlab_versions()


def _source_copy(dst: str) -> str:
    """The files a release is built from (no venvs, caches or the editable install's links)."""
    skip = shutil.ignore_patterns('.git', '.venv*', 'work_dirs', 'data', '__pycache__', '*.egg-info', '.mim',
                                  'build', 'dist', '*.so', '.pytest_cache', '.ruff_cache')
    shutil.copytree(ROOT, dst, ignore=skip, symlinks=True)
    return dst


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    """(source copy, wheel built from the sdist), made with this venv's setuptools (no download)."""
    tmp = tmp_path_factory.mktemp('pkg')
    src = _source_copy(str(tmp / 'src'))
    out = str(tmp / 'dist')
    run = dict(capture_output=True, text=True, timeout=300)
    p = subprocess.run([sys.executable, 'setup.py', '-q', 'sdist', '-d', out], cwd=src, **run)
    assert p.returncode == 0, p.stderr[-3000:]
    sdist = [f for f in os.listdir(out) if f.endswith('.tar.gz')]
    assert len(sdist) == 1, os.listdir(out)
    p = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-build-isolation', '-w', out,
                        osp.join(out, sdist[0])], cwd=str(tmp), **run)  # the sdist must hold what setup.py reads
    assert p.returncode == 0, p.stderr[-3000:]
    wheel = [f for f in os.listdir(out) if f.endswith('.whl')]
    assert len(wheel) == 1, os.listdir(out)
    return src, osp.join(out, wheel[0])


def test_wheel_metadata(built):
    _, wheel = built
    with zipfile.ZipFile(wheel) as z:
        meta_name = next(n for n in z.namelist() if n.endswith('.dist-info/METADATA'))
        meta = email.message_from_bytes(z.read(meta_name))
        names = z.namelist()
    requires = meta.get_all('Requires-Dist')
    unconditional = [r for r in requires if 'extra ==' not in r]
    assert sorted(_name(r) for r in unconditional) == ['mmengine', 'numpy'], unconditional
    assert any(r.startswith('mmcv') and 'extra == "mim"' in r for r in requires), requires
    assert meta['Requires-Python'] == '>=3.9'
    assert 'Programming Language :: Python :: 3.13' in meta.get_all('Classifier')
    assert 'dynconv_mm/.mim/configs/_quickstart_/kw1x-r18_toy-in6.py' in names  # mim train dynconv_mm CONFIG


def _dry_run(args, python=None):
    """The names pip plans to install (``pip install --dry-run --report``), or skip when pip cannot reach the index
    it asks."""
    cmd = [sys.executable, '-m', 'pip']
    if python is not None:
        cmd += ['--python', python]
    cmd += ['install', '--dry-run', '--quiet', '--report', '-', *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        if any(e in p.stderr for e in NETWORK_ERRORS):
            pytest.skip(f'pip could not reach the package index to resolve the plan: {p.stderr.strip()[-300:]}')
        raise AssertionError(p.stderr[-3000:])
    return sorted(item['metadata']['name'].lower().replace('_', '-') for item in json.loads(p.stdout)['install'])


def test_wheel_into_this_environment_installs_only_itself(built):
    _, wheel = built
    assert _dry_run([wheel]) == ['dynconv-mm']


def test_editable_install_into_this_environment_installs_only_itself(built):
    src, _ = built
    assert _dry_run(['--no-build-isolation', '-e', src]) == ['dynconv-mm']


USER_STACKS = {
    # OpenMMLab 2.x users' usual stack: torch 2.1 and OpenMMLab's prebuilt mmcv 2.1.0 wheel
    'torch2.1-mmcv': dict(torch='2.1.2', torchvision='0.16.2', numpy='1.26.4', mmengine='0.10.7', mmcv='2.1.0'),
    # the same with mmcv-lite (no compiled ops): pip must not plan an mmcv source build over it
    'torch2.1-mmcv-lite': dict(torch='2.1.2', torchvision='0.16.2', numpy='1.26.4', mmengine='0.10.7',
                               **{'mmcv-lite': '2.1.0'}),
    # the newest torch, with numpy 2
    'torch2.15-numpy2': dict(torch='2.15.0', torchvision='0.30.0', numpy='2.2.6', mmengine='0.10.7', mmcv='2.1.0'),
}


@pytest.mark.parametrize('stack', sorted(USER_STACKS))
def test_wheel_into_a_user_stack_keeps_it(built, tmp_path, stack):
    """A bare venv whose site-packages holds the metadata of the user's packages (all pip looks at)."""
    _, wheel = built
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True, timeout=120)
    python = str(venv / 'bin' / 'python')
    site = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                          capture_output=True, text=True, check=True).stdout.strip()
    for name, ver in USER_STACKS[stack].items():
        info = osp.join(site, f'{name.replace("-", "_")}-{ver}.dist-info')
        os.makedirs(info)
        with open(osp.join(info, 'METADATA'), 'w') as f:
            f.write(f'Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n')
        open(osp.join(info, 'INSTALLER'), 'w').write('pip\n')
    assert _dry_run([wheel], python=python) == ['dynconv-mm']
