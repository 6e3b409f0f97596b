"""The Colab notebooks run top to bottom (a smoke run of a few steps), so they cannot rot."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# notebook -> (figures it must show, files each arm must write, arm folders)
NOTEBOOKS = {
    'constrained_digits.ipynb': (3, ('eval.json', 'class_frequencies.png', 'samples/final.png',
                                     ), ('unconstrained', 'constrained')),
    'tiw_digits.ipynb': (4, ('eval.json', 'arm.json', 'eval_samples.npy', 'samples/final.png'),
                         ('dsm_obs', 'tiw_dsm')),
}


@pytest.mark.parametrize('name', sorted(NOTEBOOKS))
def test_notebook_executes(name, tmp_path, monkeypatch):
  num_figures, files, arms = NOTEBOOKS[name]
  path = os.path.join(ROOT, 'notebooks', name)
  workdir = tmp_path / 'run'
  monkeypatch.setenv('CDIFF_NOTEBOOK_STEPS', '20')
  monkeypatch.setenv('CDIFF_NOTEBOOK_WORKDIR', str(workdir))
  nb = nbformat.read(path, as_version=4)
  assert not any(c.get('outputs') for c in nb.cells if c.cell_type == 'code'), \
      'commit the notebook without outputs'
  client = NotebookClient(nb, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': os.path.dirname(path)}})
  client.execute()
  images = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs
            if 'image/png' in o.get('data', {})]
  assert len(images) == num_figures
  for arm in arms:
    for f in files:
      assert (workdir / arm / f).exists(), (arm, f)
  if name == 'constrained_digits.ipynb':
    assert (workdir / 'constrained' / 'lambda.png').exists()
