"""What a run writes: metrics.jsonl after a resume, TensorBoard scalars and PNG grids, each
checked against what was written or computed by hand."""

import numpy as np
import pytest

import run_files
from cdiff_jax import writers


def test_drop_after_keeps_records_up_to_the_step_and_drops_a_cut_line(tmp_path):
  """A resumed run removes what the killed run logged after its checkpoint, including a
  last line cut short mid-write, and appends after the kept records."""
  w = writers.MetricWriter(str(tmp_path), tensorboard=False)
  for step in (2, 4, 6):
    w.write(step, dict(loss=step / 10))
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 8, "lo')
  # Read before the rerun (a killed run's curves, or a run's while it writes): the records.
  assert writers.read_metrics(str(tmp_path)) == [dict(step=s, loss=s / 10) for s in (2, 4, 6)]
  w.drop_after(6)
  assert writers.read_metrics(str(tmp_path)) == [dict(step=s, loss=s / 10) for s in (2, 4, 6)]
  w.drop_after(4)
  w.write(5, dict(loss=0.5))
  assert writers.read_metrics(str(tmp_path)) == [dict(step=2, loss=0.2), dict(step=4, loss=0.4),
                                                 dict(step=5, loss=0.5)]
  # A cut line anywhere but at the end is damage, not a killed write: named, not dropped.
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 6, "lo\n{"step": 7, "loss": 0.7}\n')
  with pytest.raises(ValueError, match=r'metrics.jsonl: line 4 of 5 is not a JSON record'):
    writers.read_metrics(str(tmp_path))


def test_tensorboard_mirrors_scalars_and_each_vector_entry(tmp_path):
  w = writers.MetricWriter(str(tmp_path))
  w.write(3, dict(loss=np.float32(0.5), lam=np.array([0.25, 2.0]), note='text'))
  w.write(5, dict(loss=np.float32(0.75), lam=np.array([0.5, 4.0]), note='text'))
  w.close()
  assert run_files.tensorboard_events(tmp_path / 'tensorboard')[0] == {
      ('loss', 3): 0.5, ('lam/0', 3): 0.25, ('lam/1', 3): 2.0,
      ('loss', 5): 0.75, ('lam/0', 5): 0.5, ('lam/1', 5): 4.0}


def test_image_grid_places_images_row_major_and_maps_to_0_255():
  """Image i sits in row i // ncols, column i % ncols (so conditional grids show one class
  per column); [-1, 1] maps to [0, 255]; padding and empty cells are white."""
  n, h, w, ncols, pad = 5, 2, 3, 3, 1
  values = np.linspace(-1.0, 1.0, n)
  images = np.broadcast_to(values[:, None, None, None], (n, h, w, 1)).copy()
  grid = writers.image_grid(images, ncols=ncols, pad=pad)
  assert grid.dtype == np.uint8 and grid.shape == (2 * (h + pad) + pad, 3 * (w + pad) + pad, 1)
  expected = np.full(grid.shape, 255, np.uint8)
  for i, v in enumerate(values):
    r, c = i // ncols, i % ncols
    y, x = pad + r * (h + pad), pad + c * (w + pad)
    expected[y:y + h, x:x + w] = round((v + 1) / 2 * 255)
  np.testing.assert_array_equal(grid, expected)


@pytest.mark.parametrize('start', [0, 2])
def test_a_rerun_hides_the_killed_runs_later_points_in_tensorboard(tmp_path, start):
  """A rerun from a checkpoint (start 2), or from scratch when the killed run wrote none
  (start 0), drops the killed run's later records from metrics.jsonl and tells TensorBoard
  to hide its points from start + 1 on, so neither shows them twice."""
  killed = writers.MetricWriter(str(tmp_path))
  for step in (2, 4):
    killed.write(step, dict(loss=1.0))
  killed.close()
  rerun = writers.MetricWriter(str(tmp_path), resume_step=start)
  rerun.drop_after(start)
  rerun.write(4, dict(loss=0.5))
  rerun.close()
  kept = [2] if start == 2 else []
  assert [r['step'] for r in writers.read_metrics(str(tmp_path))] == kept + [4]
  assert run_files.tensorboard_events(tmp_path / 'tensorboard')[1] == [start + 1]


@pytest.fixture
def figures(monkeypatch):
  """Every (figure, axes) that writers.new_figure makes from now on, in order."""
  made = []
  real = writers.new_figure

  def keep(*args, **kwargs):
    made.append(real(*args, **kwargs))
    return made[-1]

  monkeypatch.setattr(writers, 'new_figure', keep)
  return made


def test_compared_curves_draw_each_run_per_entry_and_the_thresholds(tmp_path, figures):
  """One panel per entry: each run's values of that entry over its steps, b_i dashed across
  panel i, the entry's name as its title; a log scale only where values span 10x; nothing
  written when no run logged the key."""
  runs = {'a': [dict(step=10, loss=[100.0, 2.0]), dict(step=20, loss=[3.0, 1.0])],
          'b': [dict(step=10, loss=[50.0, 4.0]), dict(step=30, loss=[2.5, 0.5]),
                dict(step=40, other=1.0)]}
  path = str(tmp_path / 'c.png')
  assert writers.plot_compared_curves(path, runs, 'loss', ['x', 'y'], thresholds=[2.0, 0.7]) == path
  assert (tmp_path / 'c.png').exists()
  _, axes = figures[-1]
  for i, ax in enumerate(axes[0]):
    assert ax.get_title() == 'xy'[i]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    np.testing.assert_array_equal(lines['a'].get_xdata(), [10, 20])
    np.testing.assert_array_equal(lines['a'].get_ydata(), [[100.0, 3.0], [2.0, 1.0]][i])
    np.testing.assert_array_equal(lines['b'].get_xdata(), [10, 30])
    np.testing.assert_array_equal(lines['b'].get_ydata(), [[50.0, 2.5], [4.0, 0.5]][i])
    b = lines[f'b = {[2.0, 0.7][i]:.4g}']
    np.testing.assert_array_equal(b.get_ydata(), [[2.0, 2.0], [0.7, 0.7]][i])
    assert ax.get_yscale() == ['log', 'linear'][i]
  assert writers.plot_compared_curves(str(tmp_path / 'd.png'), runs, 'missing') is None
  assert not (tmp_path / 'd.png').exists()


def test_curves_take_a_log_scale_only_over_a_decade_and_label_its_minor_ticks(tmp_path,
                                                                              figures):
  """plot_curves(yscale='log'): a log axis where the values span more than 10x, with numbers
  on its minor ticks (a curve between 10 and 100 read no number but the decades), and a
  linear one over less than a decade (117-330: a log axis there had two labelled ticks);
  an unknown scale is refused."""
  wide = [dict(step=s, loss=v) for s, v in enumerate([300.0, 40.0, 12.0, 9.0])]
  narrow = [dict(step=s, loss=v) for s, v in enumerate([330.0, 170.0, 130.0, 117.0])]
  writers.plot_curves(str(tmp_path / 'w.png'), wide, ['loss'], yscale='log')
  _, ax = figures[-1]
  assert ax.get_yscale() == 'log'
  fig = ax.figure
  fig.canvas.draw()
  minor = [t.get_text() for t in ax.get_yticklabels(minor=True) if t.get_text()]
  assert minor, 'no labelled minor tick'
  writers.plot_curves(str(tmp_path / 'n.png'), narrow, ['loss'], yscale='log')
  assert figures[-1][1].get_yscale() == 'linear'
  with pytest.raises(ValueError, match="yscale='logarithmic'"):
    writers.plot_curves(str(tmp_path / 'x.png'), wide, ['loss'], yscale='logarithmic')


def test_arrays_are_saved_whole_as_npy_or_npz(tmp_path, monkeypatch):
  """save_arrays_atomic: a .npy of one array or a .npz of several, read back as numpy's own
  save would write them; a failed rename leaves the old file as it was."""
  a = np.arange(6, dtype=np.float16).reshape(2, 3)
  writers.save_arrays_atomic(str(tmp_path / 'x.npy'), a)
  np.testing.assert_array_equal(np.load(tmp_path / 'x.npy'), a)
  writers.save_arrays_atomic(str(tmp_path / 'x.npz'), images=a, key='abc')
  with np.load(tmp_path / 'x.npz') as f:
    np.testing.assert_array_equal(f['images'], a)
    assert str(f['key']) == 'abc'

  def no_rename(src, dst):
    raise OSError('disk full')

  monkeypatch.setattr(writers.os, 'replace', no_rename)
  with pytest.raises(OSError):
    writers.save_arrays_atomic(str(tmp_path / 'x.npy'), a + 1)
  np.testing.assert_array_equal(np.load(tmp_path / 'x.npy'), a)


def test_write_atomic_replaces_whole_and_leaves_no_temporary(tmp_path, monkeypatch):
  """The file is the old one or the new one: a write whose rename fails leaves the old file
  as it was; bytes and text both; the folder is made."""
  path = tmp_path / 'cache' / 'entry.json'
  writers.write_atomic(str(path), '{"a": 1}')
  writers.write_atomic(str(path), b'{"a": 2}')
  assert path.read_text() == '{"a": 2}'
  assert sorted(p.name for p in path.parent.iterdir()) == ['entry.json']

  def no_rename(src, dst):
    raise OSError('disk full')

  monkeypatch.setattr(writers.os, 'replace', no_rename)
  with pytest.raises(OSError):
    writers.write_atomic(str(path), '{"a": 3}')
  assert path.read_text() == '{"a": 2}'


@pytest.mark.parametrize('what', ['grid', 'figure'])
def test_a_stop_inside_a_png_write_leaves_the_old_file(tmp_path, monkeypatch, what):
  """Sample grids and figures are read back (the experiments' figures open the arms' grids):
  a stop (SIGTERM, Ctrl-C) landing inside the PNG encoder leaves the previous file whole,
  not a truncated one."""
  from matplotlib.figure import Figure
  from PIL import Image
  path = str(tmp_path / 'out.png')

  def write():
    if what == 'grid':
      writers.save_image_grid(path, np.zeros((4, 8, 8, 1), np.float32))
    else:
      fig, ax = writers.new_figure()
      ax.plot([0, 1], [1, 0])
      writers.save_figure(fig, path)

  write()
  old = open(path, 'rb').read()
  assert old.startswith(b'\x89PNG')

  def half_then_stop(self, fp, *args, **kwargs):
    if isinstance(fp, str):
      fp = open(fp, 'wb')
    fp.write(b'\x89PNG half')
    fp.flush()
    raise KeyboardInterrupt

  monkeypatch.setattr(Image.Image if what == 'grid' else Figure, 'save' if what == 'grid'
                      else 'savefig', half_then_stop)
  with pytest.raises(KeyboardInterrupt):
    write()
  assert open(path, 'rb').read() == old



@pytest.mark.parametrize('dim', [1, 2])
def test_vector_samples_are_saved_as_an_array_and_2d_ones_also_as_points(tmp_path, dim):
  """A vector model's samples (model.name='mlp') are no image grid: the array in .npy, and
  for 2-D data a scatter plot under the grid's name."""
  import types
  from cdiff_jax import train
  points = np.random.default_rng(0).uniform(-1, 1, (6, dim)).astype(np.float32)
  sample = types.SimpleNamespace(num_samples=5, use_ema=True)
  exp = types.SimpleNamespace(
      config=types.SimpleNamespace(sample=sample, seed=0),
      mesh=types.SimpleNamespace(devices=np.zeros(2)),   # 5 samples -> 6 on 2 devices
      sampler=lambda: lambda params, rng, n, labels, progress: points[:n],
      sample_labels=lambda n: None)
  state = types.SimpleNamespace(ema_params={}, params={})
  out = train.save_samples(exp, state, str(tmp_path / 'final.png'))
  np.testing.assert_array_equal(out, points)
  np.testing.assert_array_equal(np.load(tmp_path / 'final.npy'), points)
  assert (tmp_path / 'final.png').exists() == (dim == 2)
