"""The README's model zoo, generated from ``model-index.yml`` and the metafiles it imports.

``python tools/analysis/model_zoo.py`` prints the Markdown table; a test checks that the README holds
exactly this table, so the zoo never drifts from the metafiles.
"""
from __future__ import annotations

import os.path as osp
from typing import Dict, List

import yaml

__all__ = ['load_models', 'model_zoo_markdown', 'CONVERTERS']

#: collection name -> converter CLI for its official classification checkpoints
CONVERTERS: Dict[str, str] = {
    'KernelWarehouse': 'tools/model_converters/kernelwarehouse_to_mm.py',
    'DWNet': 'tools/model_converters/dwnet_to_mm.py',
    'PEDConv': 'tools/model_converters/pedconv_to_mm.py',
    'DO-Conv': 'tools/model_converters/doconv_to_mm.py',
    'OREPA': 'tools/model_converters/orepa_to_mm.py',
}
DOWNSTREAM = 'tools/model_converters/downstream_to_mm.py'


def load_models(root: str) -> List[dict]:
    """Every model entry of every metafile imported by ``<root>/model-index.yml``, in order."""
    with open(osp.join(root, 'model-index.yml')) as f:
        index = yaml.safe_load(f)
    models = []
    for rel in index.get('Import', []):
        with open(osp.join(root, rel)) as f:
            meta = yaml.safe_load(f) or {}
        models.extend(meta.get('Models', []))
    return models


def _metric(model: dict) -> str:
    parts = []
    for res in model.get('Results', []) or []:
        for k, v in (res.get('Metrics') or {}).items():
            parts.append(f'{k} {v}')
    text = ', '.join(parts) or '-'
    measured = (model.get('Metadata') or {}).get('Measured')
    return f'{text} ({measured})' if measured and parts else text


def _params(model: dict) -> str:
    p = (model.get('Metadata') or {}).get('Parameters')
    return f'{p / 1e6:.2f}M' if isinstance(p, (int, float)) else '-'


def _task(model: dict) -> str:
    """The dataset column: from the results' task, else from the training data (models without results)."""
    results = model.get('Results', []) or []
    tasks = [r.get('Task', '') for r in results]
    datasets = [r.get('Dataset', '') for r in results]
    if any(d and not d.startswith(('COCO', 'ADE20K', 'ImageNet')) for d in datasets):
        return next(d for d in datasets if d and not d.startswith(('COCO', 'ADE20K', 'ImageNet')))
    if any('Segmentation' in t and 'Semantic' in t for t in tasks):
        return 'ADE20K'
    if any('Detection' in t or 'Instance' in t for t in tasks):
        return 'COCO'
    if not tasks:
        data = str((model.get('Metadata') or {}).get('Training Data', ''))
        for name in ('COCO', 'ADE20K'):
            if name in data:
                return name
    return 'ImageNet'


def _convert(model: dict) -> str:
    task = _task(model)
    tool = CONVERTERS.get(model.get('In Collection', ''), '')
    if not model.get('Converted From'):
        return 'no official checkpoint'
    if task == 'ImageNet':
        return f'`python {tool} OFFICIAL.pth CONVERTED.pth`' if tool else '-'
    return f'`python {DOWNSTREAM} OFFICIAL.pth CONVERTED.pth --config CONFIG`'


def model_zoo_markdown(root: str) -> str:
    """The Markdown model-zoo table (published metric, our parameter count, how to convert and test)."""
    lines = ['| method | dataset | config | published result | params (ours) | convert the official checkpoint |',
             '|---|---|---|---|---|---|']
    for m in load_models(root):
        cfg = m.get('Config', '')
        lines.append(f'| {m.get("In Collection", "")} | {_task(m)} | [{osp.basename(cfg)}]({cfg}) | {_metric(m)} | '
                     f'{_params(m)} | {_convert(m)} |')
    lines.append('')
    lines.append('Test a converted checkpoint with `python tools/test.py CONFIG CONVERTED.pth` (COCO bbox/segm mAP, '
                 'ADE20K mIoU, ImageNet top-1/top-5; see each method\'s `configs/<method>/README.md`).')
    return '\n'.join(lines)
