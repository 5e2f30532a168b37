"""Packaging for dynconv_mm (OpenMMLab 2.x plugin).

Versions come from requirements.txt (one file, shared with tools/setup_env.sh). Like OpenMMLab's
own packages, configs, tools and model-index.yml are carried under ``dynconv_mm/.mim`` so that
``mim train dynconv_mm CONFIG`` works after installation.
"""
import os
import os.path as osp
import re
import shutil
import sys

from setuptools import find_packages, setup

HERE = osp.dirname(osp.abspath(__file__))


def read_requirements():
    core, extras = [], {}
    with open(osp.join(HERE, 'requirements.txt')) as f:
        for line in f:
            spec, _, comment = line.partition('#')
            spec = spec.strip()
            if not spec:
                continue
            if '[core]' in comment:
                core.append(spec)
            m = re.search(r'\[extra:(\w+)\]', comment)
            if m:
                extras.setdefault(m.group(1), []).append(spec)
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
        packages=find_packages(include=['dynconv_mm', 'dynconv_mm.*']),
        include_package_data=True,
        package_data={'dynconv_mm': ['.mim/configs/**/*', '.mim/tools/**/*', '.mim/model-index.yml', 'layers/csrc/*.c',
                                     'layers/csrc/*.h']},
        install_requires=core,
        extras_require=extras,
        zip_safe=False,
    )
