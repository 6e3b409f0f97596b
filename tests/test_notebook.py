"""The Colab notebook runs top to bottom (a smoke run of a few steps), so it cannot rot."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'notebooks', 'constrained_digits.ipynb')


def test_notebook_executes(tmp_path, monkeypatch):
  workdir = tmp_path / 'run'
  monkeypatch.setenv('CDIFF_NOTEBOOK_STEPS', '20')
  monkeypatch.setenv('CDIFF_NOTEBOOK_WORKDIR', str(workdir))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert not any(c.get('outputs') for c in nb.cells if c.cell_type == 'code'), \
      'commit the notebook without outputs'
  client = NotebookClient(nb, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}})
  client.execute()
  images = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs
            if 'image/png' in o.get('data', {})]
  assert len(images) == 3  # class frequencies, lambda curves, sample grids
  for arm in ('unconstrained', 'constrained'):
    for f in ('eval.json', 'class_frequencies.png', 'samples/final.png'):
      assert (workdir / arm / f).exists(), (arm, f)
  assert (workdir / 'constrained' / 'lambda.png').exists()
