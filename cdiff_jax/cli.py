"""Command-line plumbing shared by the launcher (``cdiff_jax.main``) and ``experiments/``.

A wrong ``--config.FIELD=VALUE`` and the errors a run can meet before or while it trains
(bad config, missing dataset, incompatible checkpoint, non-finite loss) end the program
with one ``error:`` line and exit status 2, not a traceback; a preempted run (SIGTERM)
exits with 3 after its checkpoint is saved (at once outside a training loop), and one
stopped by Ctrl-C with 130 (after a checkpoint when Ctrl-C came during training, at once
otherwise), without a traceback.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import sys
import threading

from absl import app, flags

# The flags this module defines for a program (define_config_file, define_progress_flags)
# belong to that program: its --help lists them.
flags.disclaim_key_flags()

EXIT_ERROR = 2
EXIT_PREEMPTED = 3
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports it; not 3, so a restart loop stops
INTERRUPTED_AT_ONCE = ('interrupted: stopped at once. What was saved before is kept (checkpoints, '
                       'finished arms and components); rerun the same command to go on from it.')
PREEMPTED_AT_ONCE = ('preempted: stopped at once (outside a training loop, nothing new to save). '
                     'What was saved before is kept (checkpoints, finished arms and '
                     'components); rerun the same command to go on from it.')


class _PreemptedAtOnce(Exception):
  """SIGTERM outside a training loop (whose own handler saves first)."""


def _on_sigterm(signum, frame):
  del signum, frame
  raise _PreemptedAtOnce()


def one_line_error(e: BaseException) -> str:
  msg = str(e).strip().splitlines()
  return msg[0] if msg else type(e).__name__


def _config_file_error(error: BaseException) -> str | None:
  """The one line for a config file that did not load, or None for any other error.

  ml_collections keeps that error until the config is first used (an attribute access, or
  the default config's overrides), where it would surface as a traceback.
  """
  while 'earlier failure to load' in str(error) and error.__cause__ is not None:
    error = error.__cause__
  if isinstance(error, IsADirectoryError):
    return (f'--config={error.filename}: is a folder; pass one config file (e.g. '
            'configs/digits_minority.py).')
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  if not lines or not lines[0].startswith('Failed loading config file'):
    return None
  path = lines[2] if len(lines) > 2 else '?'  # after "Attempted [Relative path]:"
  reason = ('no such file' if 'No such file' in lines[-1] else lines[-1])
  return (f'--config={path}: {reason}. Pass the path of a config file (the shipped ones are '
          'in configs/; run the commands from the repository root).')


def _check_config_files() -> None:
  """After parsing: one error line for a config flag whose file did not load."""
  for name in list(flags.FLAGS):
    value = flags.FLAGS[name].value
    if type(value).__name__ == '_ErrorConfig':  # ml_collections' stand-in for a failed load
      error = vars(value)['_error']
      print(f'error: {_config_file_error(error) or one_line_error(error)}', file=sys.stderr)
      sys.exit(EXIT_ERROR)


def _flag_error(e: Exception, argv) -> None:
  """One line naming the ``--config.FIELD=VALUE`` at fault; exits with EXIT_ERROR."""
  if (line := _config_file_error(e)) is not None:  # a default config file that did not load
    print(f'error: {line}', file=sys.stderr)
    sys.exit(EXIT_ERROR)
  if isinstance(e, AttributeError) and "attribute 'get_config'" in str(e):
    given = [a for a in argv[1:] if a.startswith('--config=')]
    print(f'error: {given[-1] + ": " if given else ""}the config file defines no get_config() '
          '(a config file\'s get_config() returns its ConfigDict).', file=sys.stderr)
    sys.exit(EXIT_ERROR)
  text = ' '.join(str(e).replace('\\n', ' ').replace('\\', '').split())
  if 'Error whilst parsing config file' in text and (raised := re.search(
      r'(\w+(?:Error|Exception): .*)$', text)):  # its get_config() raised: the error, no traceback
    given = [a for a in argv[1:] if a.startswith('--config=')]
    hint = (' (what follows ":" in --config=FILE:ARG is passed to get_config(), which takes '
            'no argument here; drop it)' if 'get_config() takes 0 positional' in text else '')
    print(f'error: {given[-1] + ": " if given else ""}its get_config() raised '
          f'{raised.group(1)}{hint}.', file=sys.stderr)
    sys.exit(EXIT_ERROR)
  while len(text) > 1 and text[0] == text[-1] and text[0] in '\'"':  # a KeyError's quotes
    text = text[1:-1]
  hint = None
  if isinstance(e, AttributeError):  # "'stepz' Did you mean "steps" instead of "stepz"?"
    hint = re.search(r'Did you mean "([\w.]+)"', text)
    text = text[:hint.start()].strip() if hint else text   # the missing name alone
    text = text.replace("'", '')
  overrides = [a for a in argv[1:] if a.startswith('--config.')]
  named = lambda name: re.search(rf'(?<![\w.]){re.escape(name)}(?![\w.])', text)
  # The override the message quotes (flag and value), else the one whose flag it names,
  # else one with a field or section name it names as a word ('steps' is not 'num_steps'),
  # the last name first.
  culprits = ([a for a in overrides if a in text] or
              [a for a in overrides if named(a.split('=')[0])] or
              [a for a in overrides if named(a.split('=')[0].split('.')[-1])] or
              [a for a in overrides if any(named(p) for p in a.split('=')[0].split('.')[1:])])
  where = f'{culprits[0]}: ' if culprits else ''
  if culprits and text.startswith(f'flag {culprits[0]}: '):  # absl repeats the flag
    text = text[len(f'flag {culprits[0]}: '):]
  if isinstance(e, AttributeError):
    text = f'no such config field {text!r}' + (f'; did you mean {hint.group(1)!r}?' if hint
                                                else '.')
  elif isinstance(e, KeyError):
    text = f'no such config section: {text}'
  for raw, plain in (('invalid literal for int() with base 10', 'must be an integer, not'),
                     ('could not convert string to float', 'must be a number, not')):
    if text.startswith(raw + ': '):
      text = f'{plain} {text[len(raw) + 2:]}.'
  print(f'error: {where}{text}', file=sys.stderr)
  sys.exit(EXIT_ERROR)


def parse_flags(argv):
  """absl's parser, with a wrong ``--config.FIELD=VALUE`` turned into one line."""
  try:
    argv = flags.FLAGS(argv)
  except Exception as e:  # flags.Error, or the config's AttributeError/TypeError/KeyError.
    _flag_error(e, argv)
  _check_config_files()
  _expand_user_paths()
  return argv


# Folders given as --flag=~/x reach the program with the '~' (the shell expands it only at
# the start of a word): every command's --workdir and the config's path fields.
PATH_CONFIG_FIELDS = ('data.data_dir', 'train.init_from', 'method.reference_workdir')


def _expand_user_paths() -> None:
  for name in list(flags.FLAGS):
    value = flags.FLAGS[name].value
    if name == 'workdir' and isinstance(value, str):
      if not value.strip():   # e.g. an unset shell variable: '' is the current folder
        print('error: --workdir is empty; give the folder of the run (e.g. --workdir=runs/x).',
              file=sys.stderr)
        sys.exit(EXIT_ERROR)
      flags.FLAGS[name].value = os.path.expanduser(value)
    elif hasattr(value, 'keys'):  # a config
      for field in PATH_CONFIG_FIELDS:
        section, key = field.split('.')
        if section in value and key in value[section] and isinstance(value[section][key], str):
          value[section][key] = os.path.expanduser(value[section][key])


def define_config_file(name: str, default: str | None, help_string: str):
  """``config_flags.DEFINE_config_file`` with a wrong override reported in one line.

  With a default config file, ml_collections applies the command line's ``--config.X=V``
  overrides while the flag is defined, before ``app.run`` parses anything.
  """
  from ml_collections import config_flags
  try:
    return config_flags.DEFINE_config_file(name, default, help_string)
  except Exception as e:  # the config's AttributeError/TypeError/KeyError/ValueError
    _flag_error(e, sys.argv)


class _ProgressFlag:
  """``--progress`` / ``--noprogress`` and ``--no_progress``, the same on every command (the
  training launcher and the sampler had only ``--no_progress``, the experiments only
  ``--noprogress``). ``.value``: show progress bars."""

  def __init__(self):
    self._show = flags.DEFINE_bool('progress', True, 'Show progress bars (--noprogress: hide).')
    self._hide = flags.DEFINE_bool('no_progress', False, 'Hide progress bars (as --noprogress).')

  @property
  def value(self) -> bool:
    return self._show.value and not self._hide.value


def define_progress_flags() -> _ProgressFlag:
  return _ProgressFlag()


def require_config(config, command: str, example: str, *, section: str | None = None,
                   method: str | None = None) -> None:
  """A ``ConfigError`` (one error line) when ``config`` is not of the kind ``command`` runs:
  one with the config section ``section`` (e.g. ``'finetune'``), or of ``method.name ==
  method``; ``example`` names a shipped config that is. Called first by the experiment
  scripts, which read their own sections and method fields."""
  from cdiff_jax.config import ConfigError
  if section is not None and section not in config:
    raise ConfigError(f'--config: {command} needs a config with a {section!r} section, such as '
                      f'{example}; this one has none.')
  if method is not None and config.method.name != method:
    raise ConfigError(f"--config: {command} runs a config of method.name={method!r}, such as "
                      f"{example}; this one has method.name={config.method.name!r}.")


def reporting_errors(main):
  """``main(argv)`` with the run's expected errors reported in one line (see the module doc)."""
  @functools.wraps(main)
  def wrapped(argv):
    from cdiff_jax import config as config_lib
    from cdiff_jax import train
    from cdiff_jax.checkpoint import IncompatibleCheckpoint
    from cdiff_jax.data.sources import DatasetNotFound
    from cdiff_jax.evaluation import NonFiniteSamples
    from cdiff_jax.parallel import DistributedSetupError
    # SIGTERM (a preemption notice) anywhere outside a training loop (set-up, between an
    # experiment's arms, its sampling and evaluation) ends the program as a preemption too,
    # so a restart loop reruns it; a training loop puts its own handler in for its steps.
    previous = None
    if threading.current_thread() is threading.main_thread():
      previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
      return main(argv)
    except _PreemptedAtOnce:
      print(PREEMPTED_AT_ONCE, file=sys.stderr)
      sys.exit(EXIT_PREEMPTED)
    except (config_lib.ConfigError, DatasetNotFound, IncompatibleCheckpoint,
            train.NonFiniteError, NonFiniteSamples, DistributedSetupError) as e:
      print(f'error: {one_line_error(e)}', file=sys.stderr)
      sys.exit(EXIT_ERROR)
    except train.Preempted as e:
      print(str(e), file=sys.stderr)
      sys.exit(EXIT_INTERRUPTED if e.interrupted else EXIT_PREEMPTED)
    except KeyboardInterrupt:
      # Ctrl-C outside a training loop (set-up, sampling, evaluation, the MLPs of
      # toy_composition) or a second Ctrl-C inside one: stopped at once.
      print(f'\n{INTERRUPTED_AT_ONCE}', file=sys.stderr)
      sys.exit(EXIT_INTERRUPTED)
    finally:
      if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
  return wrapped


def run(main) -> None:
  """``app.run`` with the parser and error reporting above."""
  app.run(reporting_errors(main), flags_parser=parse_flags)
