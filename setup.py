"""Packaging for dynconv_mm (OpenMMLab 2.x plugin).

Supported: Python 3.9 to 3.13; torch 2.1 to 2.15 (tested in CI on 2.1.2, 2.14.1 and 2.15.0), with
mmengine >= 0.7, < 1.0 and mmcv (or mmcv-lite) >= 2.0.0, < 2.2.0.

Requirements are ranges, the way OpenMMLab's own packages declare them, so that installing dynconv_mm
into an existing environment keeps its torch, numpy, mmengine and mmcv: ``install_requires`` comes from
requirements/runtime.txt (no torch or torchvision: the user's build stays); mmcv is the ``mim`` extra
(requirements/mminstall.txt), checked when dynconv_mm is imported; the task libraries and the test tools
are extras. The exact versions of the development stack are in requirements.txt, read only by
tools/setup_env.sh. Like OpenMMLab's packages, configs, tools and model-index.yml are carried under
``dynconv_mm/.mim`` so that ``mim train dynconv_mm CONFIG`` works after installation.
"""
import os
import os.path as osp
import re
import shutil
import sys

from setuptools import find_packages, setup

HERE = osp.dirname(osp.abspath(__file__))


def parse_requirements(name):
    """The requirement lines of requirements/NAME.txt (comments and blank lines dropped)."""
    with open(osp.join(HERE, 'requirements', f'{name}.txt')) as f:
        return [line.split('#', 1)[0].strip() for line in f if line.split('#', 1)[0].strip()]


def read_requirements():
    core = parse_requirements('runtime')
    extras = {name: parse_requirements(name) for name in ('mmdet', 'mmseg', 'mmpretrain', 'lite0', 'tests')}
    extras['mim'] = parse_requirements('mminstall')
    extras['all'] = sorted({s for v in extras.values() for s in v})
    return core, extras


def get_version():
    with open(osp.join(HERE, 'dynconv_mm', 'version.py')) as f:
        return re.search(r"__version__ = '([^']+)'", f.read()).group(1)


def add_mim_extension():
    """Link (editable/develop) or copy (wheel/sdist) configs, tools and model-index.yml into
    ``dynconv_mm/.mim``, following mmdet's and mmpretrain's setup.py."""
    if 'develop' in sys.argv or 'editable_wheel' in sys.argv:
        mode = 'symlink'
    elif any(cmd in sys.argv for cmd in ('sdist', 'bdist_wheel', 'install', 'build')):
        mode = 'copy'
    else:
        return
    mim_path = osp.join(HERE, 'dynconv_mm', '.mim')
    os.makedirs(mim_path, exist_ok=True)
    for name in ('configs', 'tools', 'model-index.yml'):
        src = osp.join(HERE, name)
        dst = osp.join(mim_path, name)
        if not osp.exists(src):
            continue
        if osp.islink(dst) or osp.isfile(dst):
            os.remove(dst)
        elif osp.isdir(dst):
            shutil.rmtree(dst)
        if mode == 'symlink':
            os.symlink(osp.relpath(src, mim_path), dst)
        elif osp.isdir(src):
            shutil.copytree(src, dst)
        else:
            shutil.copyfile(src, dst)


if __name__ == '__main__':
    add_mim_extension()
    core, extras = read_requirements()
    setup(
        name='dynconv_mm',
        version=get_version(),
        description='Dynamic and re-parameterized convolutions, and their backbones, for OpenMMLab 2.x',
        long_description=open(osp.join(HERE, 'README.md')).read() if osp.exists(osp.join(HERE, 'README.md')) else '',
        long_description_content_type='text/markdown',
        license='Apache-2.0',
        python_requires='>=3.9',
        classifiers=[
            'License :: OSI Approved :: Apache Software License',
            'Operating System :: OS Independent',
            *(f'Programming Language :: Python :: 3.{minor}' for minor in range(9, 14)),
        ],
        packages=find_packages(include=['dynconv_mm', 'dynconv_mm.*']),
        include_package_data=True,
        package_data={'dynconv_mm': ['.mim/configs/**/*', '.mim/tools/**/*', '.mim/model-index.yml', 'layers/csrc/*.c',
                                     'layers/csrc/*.h']},
        install_requires=core,
        extras_require=extras,
        zip_safe=False,
    )
