"""Model FLOP utilization of the train step and sampling throughput, on whatever devices
JAX sees (meant for GPUs and TPUs; runs on CPU too, without an MFU unless --peak_tflops).

  python benchmarks/mfu.py --config=configs/digits_minority.py
  python benchmarks/mfu.py --config=configs/mnist_minority.py --config.model.dtype=bfloat16 \\
      --config.data.source=idx --config.data.data_dir=DIR --out=mfu.json

* FLOPs per step: XLA's cost analysis of the one-step program (forward, backward,
  optimizer, EMA and the method's extra updates) as lowered, before XLA's optimizations
  and the partitioning over devices (``common.program_flops``) on one process's share of
  the batch; per device is that over the process's devices. Not the compiled program's
  count: on GPUs that one leaves out the convolutions run as cuDNN calls. Measured on a
  k=1 program even when the config runs ``train.steps_per_call=k`` steps per call, because
  XLA counts a loop body once.
* Step time: median over ``--rounds`` rounds of ``--calls`` calls each, after warm-up,
  timed with ``block_until_ready``; the data are real batches prepared beforehand.
* MFU: achieved FLOP/s per device over the device's dense peak for the compute dtype
  (bf16 peak for ``model.dtype=bfloat16``; on GPUs the TF32 peak for float32, which is
  what XLA's default matmul precision uses there), from the table below or
  ``--peak_tflops``.
* Sampling: images/s and network evaluations/s of the config's sampler (``sample.*``) on
  ``--samples`` images, after a warm-up call that compiles it.

Launched like the trainer (``train.setup_jax``: XLA:CPU options, multi-host start, the
persistent compilation cache unless ``--config.train.compilation_cache=False``); a wrong
``--config.FIELD`` is one error line. A constrained config whose thresholds come from a
reference run (the shipped minority configs) is timed with absolute thresholds when no
``method.reference_workdir`` is given: the thresholds do not change the step's cost.

Prints a table with the device name and writes JSON with ``--out``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

# Dense peak TFLOP/s per device from the vendors' spec sheets: (bf16, float32 as computed
# by default). Matched against jax's device_kind as whole words, first match wins (so 'L4'
# is not an L40S: an unknown device gets no peak, and --peak_tflops names it).
PEAK_TFLOPS = (
    ('H100 PCIe', (756.0, 378.0)),
    ('H100 NVL', (835.0, 418.0)),
    ('H100', (989.0, 495.0)),      # SXM; float32 matmuls run as TF32
    ('H200 NVL', (835.0, 418.0)),
    ('H200', (989.0, 495.0)),
    ('A100', (312.0, 156.0)),
    ('L4', (121.0, 60.0)),
    ('A10G', (125.0, 62.5)),
    ('TPU v4', (275.0, 275.0)),    # TPUs run float32 matmuls as bf16 passes by default
    ('TPU v5 lite', (197.0, 197.0)),
    ('TPU v5e', (197.0, 197.0)),
    ('TPU v5p', (459.0, 459.0)),
    ('TPU v5', (459.0, 459.0)),
    ('TPU v6 lite', (918.0, 918.0)),
    ('TPU v6e', (918.0, 918.0)),
)


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  for name, (bf16, f32) in PEAK_TFLOPS:
    if re.search(rf'(?<![0-9a-z]){re.escape(name.lower())}(?![0-9a-z])', device_kind.lower()):
      return bf16 if dtype == 'bfloat16' else f32
  return None


def step_flops(exp, state, batch) -> float:
  """Global FLOPs of one training step (``common.program_flops`` of the one-step function:
  the lowered program's count, the same on every platform)."""
  from benchmarks import common
  from cdiff_jax import train_step as train_step_lib
  step_fn = train_step_lib.make_step_fn(exp.method, exp.tx, exp.lr_fn,
                                        exp.config.train.ema_decay)
  return common.program_flops(step_fn, state, batch)


def speed_config(config):
  """``config`` ready to be timed on its own: a constrained config whose thresholds come
  from a reference run (``threshold_mode='reference'``) that is not given gets absolute
  thresholds instead, since the thresholds' values change nothing in the step's cost."""
  mc = config.method
  if (mc.get('name') == 'constrained' and mc.get('threshold_mode') == 'reference'
      and not mc.reference_workdir):
    mc.threshold_mode, mc.target_frequency = 'absolute', 0.0
    print('method.threshold_mode: absolute thresholds for this measurement (no '
          'method.reference_workdir given; the step costs the same)')
  return config


def measure(config, calls: int = 10, rounds: int = 3, warmup: int = 2, num_samples: int = 256,
            peak: float | None = None) -> dict:
  import jax
  from cdiff_jax import parallel, train
  from cdiff_jax.state import num_params

  config = speed_config(config)
  train.setup_jax(config)  # as the launcher: XLA:CPU options, multi-host start, cache
  exp = train.build(config)
  k = config.train.steps_per_call
  state = exp.init_state()
  lead = 0 if k == 1 else 1
  host = [exp.batcher.batch(s) if k == 1 else exp.batcher.stacked(s * k, k)
          for s in range(warmup + calls)]
  batches = [parallel.put_batch(b, exp.mesh, leading_axes=lead) for b in host]
  devices = exp.mesh.devices.size
  # This process's rows of the batch, shared by its own devices of the mesh.
  flops = step_flops(exp, state, exp.batcher.batch(0)) / (devices // jax.process_count())

  t0 = time.perf_counter()
  for b in batches[:warmup]:
    state, metrics = exp.step(state, b)
  jax.block_until_ready((state, metrics))
  compile_and_warmup = time.perf_counter() - t0
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    for b in batches[warmup:]:
      state, metrics = exp.step(state, b)
    jax.block_until_ready((state, metrics))
    times.append((time.perf_counter() - t0) / (calls * k))
  step_time = float(np.median(times))

  device_kind = jax.devices()[0].device_kind
  peak = peak if peak is not None else peak_tflops(device_kind, config.model.dtype)
  achieved = flops / step_time / 1e12  # TFLOP/s per device
  result = dict(
      device=device_kind, platform=jax.default_backend(), num_devices=devices,
      num_processes=jax.process_count(), dtype=config.model.dtype,
      params=num_params(state.params), image_shape=list(exp.image_shape),
      global_batch=exp.batcher.global_batch_size, steps_per_call=k,
      step_time_ms=step_time * 1e3, train_images_per_sec=exp.batcher.global_batch_size / step_time,
      flops_per_step_per_device=flops, tflops_per_device=achieved,
      peak_tflops_per_device=peak, mfu=(achieved / peak) if peak else None,
      compile_and_warmup_s=compile_and_warmup)

  n = -(-num_samples // devices) * devices
  sampler = exp.sampler()
  params = state.ema_params
  labels = exp.sample_labels(n)
  guided = 2 if labels is not None and config.sample.get('guidance_scale', 1.0) != 1.0 else 1
  jax.block_until_ready(sampler(params, jax.random.key(0), n, labels))  # compile
  t0 = time.perf_counter()
  jax.block_until_ready(sampler(params, jax.random.key(1), n, labels))
  seconds = time.perf_counter() - t0
  result.update(sampler=config.sample.sampler, sample_steps=config.sample.num_steps,
                samples=n, sample_images_per_sec=n / seconds,
                # num_steps moves and the final denoising; classifier-free guidance runs the
                # network on the conditional and the null label at each.
                network_evals_per_sec=n * (config.sample.num_steps + 1) * guided / seconds)
  return result


def table(r: dict) -> str:
  mfu = f"{100 * r['mfu']:.1f}%" if r['mfu'] is not None else 'n/a (no peak known; --peak_tflops)'
  rows = [
      ('device', f"{r['num_devices']} x {r['device']} ({r['platform']}, {r['num_processes']} process(es))"),
      ('model', f"{r['params']:,} parameters, images {tuple(r['image_shape'])}, compute {r['dtype']}"),
      ('global batch', f"{r['global_batch']} ({r['steps_per_call']} step(s) per call)"),
      ('train step', f"{r['step_time_ms']:.2f} ms, {r['train_images_per_sec']:.0f} images/s"),
      ('FLOPs / step / device', f"{r['flops_per_step_per_device'] / 1e9:.2f} GFLOP"),
      ('achieved', f"{r['tflops_per_device']:.2f} TFLOP/s per device"),
      ('MFU', mfu),
      ('sampling', f"{r['sample_images_per_sec']:.1f} images/s ({r['sampler']}, {r['sample_steps']} "
                   f"steps, {r['samples']} images; {r['network_evals_per_sec']:.0f} network evals/s)"),
  ]
  return '\n'.join(['| | |', '|---|---|'] + [f'| {a} | {b} |' for a, b in rows])


def main(argv):
  del argv
  config = _CONFIG.value
  result = measure(config, _CALLS.value, _ROUNDS.value, num_samples=_SAMPLES.value,
                   peak=_PEAK.value)
  print(table(result))
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(result, f, indent=2)


if __name__ == '__main__':
  from absl import flags
  from cdiff_jax import cli
  _CONFIG = cli.define_config_file('config', 'configs/digits_minority.py',
                                   'Config file (its fields can be overridden).')
  _CALLS = flags.DEFINE_integer('calls', 20, 'Timed step calls per round.')
  _ROUNDS = flags.DEFINE_integer('rounds', 3, 'Rounds (the median is reported).')
  _SAMPLES = flags.DEFINE_integer('samples', 256, 'Images per sampling call.')
  _PEAK = flags.DEFINE_float('peak_tflops', None, 'Dense peak TFLOP/s per device (overrides the table).')
  _OUT = flags.DEFINE_string('out', '', 'Write the figures as JSON here.')
  cli.run(main)  # a wrong --config.FIELD or config: one error line
