"""Launcher: ``python -m cdiff_jax.main --config=configs/NAME.py --workdir=DIR``.

Fields are overridden with ``--config.FIELD=VALUE`` (e.g. ``--config.train.steps=500``).
A wrong field name or value stops here with one line naming it.

Exit status: 0 done; 2 the run cannot start or went non-finite (one ``error:`` line on
stderr, nothing written to the workdir, its checkpoints untouched); 3 preempted (SIGTERM):
a checkpoint was saved at the next step boundary, rerun the same command to resume.
"""

from __future__ import annotations

import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file under configs/.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and samples.')
_NO_PROGRESS = flags.DEFINE_bool('no_progress', False, 'Hide progress bars.')

EXIT_ERROR = 2
EXIT_PREEMPTED = 3


def _one_line_error(e: BaseException) -> str:
  msg = str(e).strip().splitlines()
  return msg[0] if msg else type(e).__name__


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    # Orbax and TFDS log every file operation at INFO; keep the console for progress.
    absl_logging.set_verbosity(absl_logging.WARNING)
  from cdiff_jax import config as config_lib
  from cdiff_jax import train
  from cdiff_jax.checkpoint import IncompatibleCheckpoint
  from cdiff_jax.data.sources import DatasetNotFound
  from cdiff_jax.parallel import DistributedSetupError
  config = _CONFIG.value
  try:
    result = train.train_and_evaluate(config, _WORKDIR.value, progress=not _NO_PROGRESS.value)
  except (config_lib.ConfigError, DatasetNotFound, IncompatibleCheckpoint,
          train.NonFiniteError, DistributedSetupError) as e:
    print(f'error: {_one_line_error(e)}', file=sys.stderr)
    sys.exit(EXIT_ERROR)
  except train.Preempted as e:
    print(str(e), file=sys.stderr)
    sys.exit(EXIT_PREEMPTED)
  print(f"done: step {result['final_step']}, outputs in {result['workdir']}")


def _parse_flags(argv):
  """absl's parser, with a wrong ``--config.FIELD=VALUE`` turned into one line."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # flags.Error, or the config's AttributeError/TypeError/KeyError.
    text = ' '.join(str(e).replace('\\n', ' ').replace('\\', '').split()).strip('\'"')
    culprits = [a for a in argv[1:] if a.startswith('--config.') and
                a.split('=')[0].split('.')[-1] in text]
    where = f'{culprits[0]}: ' if culprits else ''
    if isinstance(e, AttributeError):
      text = 'no such config field. ' + text.replace("'", '')
    print(f'error: {where}{text}', file=sys.stderr)
    sys.exit(EXIT_ERROR)


def run():
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
