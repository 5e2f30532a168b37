"""Every tool's ``--help`` says what it does in whole sentences: the first paragraph of its docstring."""
import glob
import importlib.util
import os.path as osp
import re

import pytest

from dynconv_mm.utils.cli import description

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOOLS = sorted(p for p in glob.glob(osp.join(ROOT, 'tools', '**', '*.py'), recursive=True)
               if 'def parse_args' in open(p).read())


def test_description_is_the_first_paragraph():
    doc = 'Fold a model into plain\nconvolutions, after checking it.\n\n    usage line\n'
    assert description(doc) == 'Fold a model into plain convolutions, after checking it.'


@pytest.mark.parametrize('path', TOOLS, ids=[osp.relpath(p, ROOT) for p in TOOLS])
def test_help_ends_with_a_whole_sentence(path, capsys):
    spec = importlib.util.spec_from_file_location(osp.splitext(osp.basename(path))[0], path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with pytest.raises(SystemExit) as e:
        tool.parse_args(['--help'])
    assert e.value.code == 0
    text = ' '.join(capsys.readouterr().out.split())
    first = description(tool.__doc__)
    assert first.endswith('.') and first in text, f'--help shows {text[:300]!r}'
    assert not re.search(r'\b(?:into|and|or|the|a|of|with|to)$', first)
