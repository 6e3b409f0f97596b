#!/usr/bin/env bash
# The speed comparison on a GPU in one go: the train step and DDIM against the PyTorch port
# on the same GPU (float32/TF32, then bfloat16 under autocast at a GPU-sized batch), and
# the step's MFU with `mfu.py`. Each part has its own time limit and writes its log and
# JSON to OUT_DIR, so a part that fails or runs out of time leaves the others' figures.
#
#   bash benchmarks/gpu.sh OUT_DIR [MNIST_IDX_DIR]
#
# PYTHON (default .venv/bin/python) needs jax with CUDA and this project's dependencies,
# TORCH_PYTHON (default: PYTHON) a CUDA build of torch. With MNIST_IDX_DIR (MNIST's IDX
# files) `mfu.py` times configs/mnist_minority.py, else configs/digits_minority.py.
# TORCH_DEVICE=cpu runs the same parts with PyTorch on the CPU (a dry run of this script
# where there is no GPU); REPEATS sets the alternating rounds (default 3). JAX gets 45% of
# the GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION), PyTorch the rest.
set -u
out=${1:?usage: bash benchmarks/gpu.sh OUT_DIR [MNIST_IDX_DIR]}
data=${2:-}
py=${PYTHON:-.venv/bin/python}
tpy=${TORCH_PYTHON:-$py}
dev=${TORCH_DEVICE:-cuda}
rounds=${REPEATS:-3}
mkdir -p "$out"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}

part() {  # part NAME SECONDS COMMAND...: run it under a time limit, keep its log, show the end
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s)"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "== $name: exit status $?"
  tail -n 12 "$out/$name.log"
}

side=(--torch-python "$tpy" --torch-device "$dev" --repeats "$rounds")
part train_float32 180 "$py" benchmarks/train_step.py "${side[@]}" --settle 1 \
  --models default,mnist28 --steps-per-call 1 --json "$out/train_float32.json"
part train_bfloat16 180 "$py" benchmarks/train_step.py "${side[@]}" --settle 1 \
  --models default,mnist28 --steps-per-call 1 --set model.dtype=bfloat16 \
  --set train.batch_size=256 --json "$out/train_bfloat16.json"
part sampling 150 "$py" benchmarks/sampling.py "${side[@]}" --models default,mnist28 \
  --levels 20 --kinds ula,hmc --json "$out/sampling.json"
if [ -n "$data" ]; then
  cfg=(--config=configs/mnist_minority.py --config.data.source=idx "--config.data.data_dir=$data")
else
  cfg=(--config=configs/digits_minority.py)
fi
part mfu_bfloat16 120 "$py" benchmarks/mfu.py "${cfg[@]}" --config.model.dtype=bfloat16 \
  "--out=$out/mfu_bfloat16.json"
