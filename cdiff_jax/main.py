"""Launcher: ``python -m cdiff_jax.main --config=configs/NAME.py --workdir=DIR``.

Fields are overridden with ``--config.FIELD=VALUE`` (e.g. ``--config.train.steps=500``).
A wrong field name or value stops here with one line naming it.

Exit status: 0 done; 2 the run cannot start (one ``error:`` line on stderr, nothing
written to the workdir, its checkpoints untouched) or went non-finite (one ``error:`` line;
nothing is saved after the bad step, the checkpoints before it are kept); 3 preempted
(SIGTERM): a checkpoint was saved at the next step boundary, rerun the same command to
resume; 130 the same after Ctrl-C (a second Ctrl-C stops at once).
"""

from __future__ import annotations

from absl import app, flags
from absl import logging as absl_logging

from cdiff_jax import cli

_CONFIG = cli.define_config_file('config', None, 'Path to a config file under configs/.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and samples.')
_PROGRESS = cli.define_progress_flags()

EXIT_ERROR, EXIT_PREEMPTED = cli.EXIT_ERROR, cli.EXIT_PREEMPTED


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    # Orbax and TFDS log every file operation at INFO; keep the console for progress.
    absl_logging.set_verbosity(absl_logging.WARNING)
  from cdiff_jax import train
  result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                                    progress=_PROGRESS.value)
  print(f"done: step {result['final_step']}, outputs in {result['workdir']}")


def run():
  flags.mark_flags_as_required(['config', 'workdir'])
  cli.run(main)


if __name__ == '__main__':
  run()
