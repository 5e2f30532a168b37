"""Print the README's model-zoo table, generated from model-index.yml and the metafiles.

    python tools/analysis/model_zoo.py
"""
import os.path as osp

from dynconv_mm.utils.model_zoo import model_zoo_markdown

if __name__ == '__main__':
    print(model_zoo_markdown(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))))
