__version__ = '0.1.0'

#: ``[minimum, maximum)`` of mmcv (or mmcv-lite) and mmengine, as in requirements/mminstall.txt and
#: requirements/runtime.txt; checked when dynconv_mm is imported.
MMCV_RANGE = ('2.0.0', '2.2.0')
MMENGINE_RANGE = ('0.7.0', '1.0.0')


def check_openmmlab_versions() -> None:
    """Raise ``ImportError`` naming the fix when mmengine or mmcv is missing or outside its range.

    mmcv is not an ``install_requires`` of the package (pip cannot tell OpenMMLab's prebuilt mmcv wheels or
    mmcv-lite from a missing mmcv and would plan a 15-minute source build), so it is checked here, the way
    mmdet and mmpretrain check it on import.
    """
    fixes = {'mmengine': f'pip install "mmengine>={MMENGINE_RANGE[0]},<{MMENGINE_RANGE[1]}"',
             'mmcv': f'mim install "mmcv>={MMCV_RANGE[0]},<{MMCV_RANGE[1]}" (mmcv-lite works too when no '
                     'compiled ops are needed), or pip install "dynconv_mm[mim]"'}
    try:
        import mmengine
        from mmengine.utils import digit_version
    except ImportError as e:
        raise ImportError(f'dynconv_mm needs mmengine, which cannot be imported ({e}). Install it: '
                          f'{fixes["mmengine"]}') from e
    try:
        import mmcv
    except ImportError as e:
        raise ImportError(f'dynconv_mm needs mmcv, which cannot be imported ({e}). Install it: {fixes["mmcv"]}') from e
    for name, module, (low, high) in (('mmengine', mmengine, MMENGINE_RANGE), ('mmcv', mmcv, MMCV_RANGE)):
        version = module.__version__
        if not digit_version(low) <= digit_version(version) < digit_version(high):
            raise ImportError(f'{name}=={version} is installed, but dynconv_mm needs {name}>={low},<{high}. '
                              f'Install a supported one: {fixes[name]}')
