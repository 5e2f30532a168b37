"""The README stays true: its model zoo is the one generated from the metafiles, every shipped config is
in it, and the commands it names exist."""
import glob
import os.path as osp
import re

from dynconv_mm.utils.model_zoo import load_models, model_zoo_markdown

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def _readme():
    with open(osp.join(ROOT, 'README.md')) as f:
        return f.read()


def test_readme_model_zoo_matches_metafiles():
    assert model_zoo_markdown(ROOT) in _readme(), \
        'README model zoo is stale: regenerate it with python tools/analysis/model_zoo.py'


def test_every_config_is_in_a_metafile():
    listed = {m['Config'] for m in load_models(ROOT)}
    shipped = {osp.relpath(p, ROOT) for p in glob.glob(osp.join(ROOT, 'configs', '*', '*.py'))
               if '/_base_/' not in p and '/_quickstart_/' not in p
               and '_deploy_' not in p}  # deploy forms of a listed model (tools/reparameterize.py writes them too)
    assert shipped == listed, f'not in metafiles: {sorted(shipped - listed)}; missing files: {sorted(listed - shipped)}'


def test_readme_paths_exist():
    for path in set(re.findall(r'`(?:bash |python )?((?:tools|configs|docs)/[\w./-]+\.(?:py|sh|md))', _readme())):
        assert osp.exists(osp.join(ROOT, path)), path
