"""The Colab notebooks run top to bottom (a smoke run of a few steps), so they cannot rot,
and the tables they print are the figures their arms wrote (eval.json, metrics.jsonl;
toy_table.json for the composition experiment)."""

import json
import os

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

import run_files
from cdiff_jax import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROJECT_XLA_OPTIONS = {f.split('=')[0] for f in parallel.DEFAULT_XLA_CPU_FLAGS.split()}

# notebook -> (figures it must show, files each arm must write, arm folders)
NOTEBOOKS = {
    'constrained_digits.ipynb': (3, ('eval.json', 'class_frequencies.png', 'samples/final.png',
                                     ), ('unconstrained', 'constrained')),
    'tiw_digits.ipynb': (4, ('eval.json', 'arm.json', 'eval_samples.npy', 'samples/final.png'),
                         ('dsm_obs', 'tiw_dsm')),
    # the experiment's own workdir: no arms
    'composition_mcmc.ipynb': (7, ('toy_table.json', 'toy_samples.npz', 'components.png',
                                   'toy_product.png', 'toy_acceptance.png',
                                   'components/ring.msgpack'), ('.',)),
}


# The composition and TIW notebooks (3.3 and 1.3 min on a 2-core CPU) run with `make
# test-all`: the experiments they show are tested end to end in test_experiment_main.py.
@pytest.mark.parametrize('name', [pytest.param(n, marks=pytest.mark.slow)
                                  if n in ('composition_mcmc.ipynb', 'tiw_digits.ipynb') else n
                                  for n in sorted(NOTEBOOKS)])
def test_notebook_executes(name, tmp_path, monkeypatch):
  num_figures, files, arms = NOTEBOOKS[name]
  path = os.path.join(ROOT, 'notebooks', name)
  workdir = tmp_path / 'run'
  monkeypatch.setenv('CDIFF_NOTEBOOK_STEPS', '20')
  monkeypatch.setenv('CDIFF_NOTEBOOK_WORKDIR', str(workdir))
  # The kernel starts without the project's XLA:CPU option, as a fresh Colab runtime: the
  # notebook sets it up before it touches a device, or XLA never reads it (a warning).
  monkeypatch.setenv('XLA_FLAGS', ' '.join(f for f in os.environ.get('XLA_FLAGS', '').split()
                                           if f.split('=')[0] not in _PROJECT_XLA_OPTIONS))
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
  stderr = ''.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code'
                   for o in c.outputs if o.get('name') == 'stderr')
  assert 'not applied' not in stderr, stderr[-2000:]
  printed = run_files.markdown_rows('\n'.join(
      o.get('text', '') for c in nb.cells if c.cell_type == 'code' for o in c.outputs
      if o.get('output_type') == 'stream'))
  if name == 'composition_mcmc.ipynb':
    _assert_composition_rows(printed, workdir)
    return
  assert set(printed) == set(NOTEBOOK_ROWS[name]), printed
  for row_name, arm in NOTEBOOK_ROWS[name].items():
    _assert_row_is_the_arms_figures(printed[row_name], workdir / arm)


# notebook -> {printed table row: arm folder}
NOTEBOOK_ROWS = {
    'constrained_digits.ipynb': {'unconstrained': 'unconstrained', 'constrained': 'constrained'},
    'tiw_digits.ipynb': {'DSM(obs)': 'dsm_obs', 'TIW-DSM': 'tiw_dsm'},
}


def _assert_row_is_the_arms_figures(row: dict, arm):
  """A printed row's TV, FID, minority frequencies / tail mass and final multipliers are
  those of the arm's eval.json and last metrics record, to the printed digits."""
  with open(arm / 'eval.json') as f:
    ev = json.load(f)
  freqs = np.asarray(ev['class_frequencies'])
  assert abs(float(row['TV to uniform']) - ev['tv_to_uniform']) <= 5e-4, row
  assert abs(float(row['classifier FID']) - ev['classifier_fid']) <= 5e-3, row
  if 'tail mass (5-9)' in row:
    assert abs(float(row['tail mass (5-9)']) - freqs[5:].sum()) <= 5e-4, row
    return
  np.testing.assert_allclose(run_files.floats(row['minority freq. (4, 5, 7)']),
                             freqs[[4, 5, 7]], atol=5e-4)
  if arm.name == 'constrained':
    with open(arm / 'metrics.jsonl') as f:
      last = [json.loads(line) for line in f][-1]
    np.testing.assert_allclose(run_files.floats(row['lambda (end)']), last['lam'], atol=5e-4)
  else:
    assert row['lambda (end)'] == '0 (fixed)', row


def _assert_composition_rows(printed: dict, workdir):
  """The composition notebook's tables: each LL (acceptance) cell is the experiment's
  toy_table.json row to the printed digits, one row per target and component source; and
  the HMC step-size row 0.5 is annealed HMC over the saved ring and bar models, composed
  and run again here."""
  import flax.serialization
  import jax
  from cdiff_jax import toys, train
  from cdiff_jax.methods import guidance
  from cdiff_jax.sampling import mcmc
  with open(workdir / 'toy_table.json') as f:
    rows = json.load(f)['rows']
  config = train.load_config(str(workdir))
  n = config.toy.num_samples
  expected = {f'{b}, {c}' for b in config.toy.benchmarks for c in config.toy.components}
  assert set(printed) == expected | {'0.1', '0.5', '2.0'}, printed
  for r in rows:
    key = f"{r['benchmark']}, {r['components']}"
    if key not in expected:
      continue  # the components' own rows are not printed
    cell = run_files.floats(printed[key][r['sampler']].replace('(', ' ').replace(')', ' '))
    assert abs(cell[0] - r['log_likelihood']) <= 5e-4, (key, r)
    assert abs(float(printed[key]['exact samples']) - r['exact_log_likelihood']) <= 5e-4
    if r['accept_rate'] is None:
      assert len(cell) == 1, (key, cell)
    else:
      assert abs(cell[1] - r['accept_rate']) <= 5e-3, (key, r)

  params = []
  for name in ('ring', 'vertical_bar'):
    with open(workdir / 'components' / f'{name}.msgpack', 'rb') as f:
      params.append(flax.serialization.msgpack_restore(f.read()))
  model = train.build_score_model(config, num_classes=1)
  potential = guidance.combine(guidance.model_components(model), 'product', (1.0, 1.0))
  mc = config.mcmc
  x, info = mcmc.AnnealedMCMC(potential, model.schedule, (2,), kind='hmc',
                              num_steps=config.sample.num_steps,
                              steps_per_level=mc.steps_per_level, step_size=0.5,
                              num_leapfrog=mc.num_leapfrog, damping=mc.damping)(
      guidance.stack_params(params), jax.random.key(0), n)
  target = toys.benchmarks()['product'].target
  ll = np.asarray(target.log_prob(x))
  ll = np.maximum(np.where(np.isfinite(ll), ll, -20.0), -20.0).mean()
  row = printed['0.5']
  assert abs(float(row['mean acceptance']) - float(np.mean(info['accept_rate']))) <= 5e-4, row
  assert abs(float(row['LL']) - ll) <= 5e-4, (row, ll)
