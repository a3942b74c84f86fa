#!/usr/bin/env bash
# First check on a CUDA machine: devices, training/eval throughput, a 1-epoch CIFAR-10 run.
#
#   bash experiments/gpu_check.sh --data=CIFAR.npz                # CUDA machine, < 10 min
#   bash experiments/gpu_check.sh --cpu --data=CIFAR.npz          # this script's own test
#   bash experiments/gpu_check.sh --python=/path/bin/python --data=CIFAR.npz
#   bash experiments/gpu_check.sh --paper_cifar --data=CIFAR.npz [--budget_s=600]
#
# CIFAR.npz: x_train, y_train, x_test, y_test (uint8 NHWC), e.g. CIFAR-10 from
# tfds or torchvision saved with numpy.savez.
#
# Default: creates a fresh venv (VENV, default $TMP/irnet_gpu_venv), installs
# requirements.txt and `jax[$JAX_EXTRA]` (default cuda12) into it. --python=PY uses an
# existing interpreter with a CUDA jax instead (a machine without network access);
# --cpu uses the current `python`, skips the CUDA install and shrinks every step
# (small batches, ResNet-18 at 64 px, a few steps) so it runs in minutes on a CPU.
#
# Steps: print the devices; experiments/throughput.py for CIFAR ResNet-20 and ImageNet
# ResNet-18, each binary (1w1a) and its full-precision twin, float32 and bfloat16
# compute (8 runs); one epoch of cifar10_resnet20 on the npz through the
# launcher. A failing step is recorded and the others still run. The last stdout line
# is one JSON object with every figure ("failed" lists failed steps; exit status 1 if
# any).
#
# --paper_cifar instead reproduces the paper's CIFAR-10 row (ResNet-20 1w1a, 400 epochs,
# batch 128) with the data on the device and K steps per device call, for as many
# epochs as fit in --budget_s seconds (schedules scaled, and said so):
# experiments/paper_cifar.py, which prints test accuracy per epoch and ends in a JSON
# line (GPU_CHECK_PAPER_K steps per call, default 390 = one epoch; GPU_CHECK_PAPER_DTYPE
# float32 or bfloat16). With --cpu: a 512-image subset for 2 epochs (its test). Sizes can be overridden with environment variables:
#   GPU_CHECK_STEPS, GPU_CHECK_WARMUP     timed / untimed throughput steps
#   GPU_CHECK_R20_BATCH                   ResNet-20 batch (GPU 1024, --cpu 32)
#   GPU_CHECK_R18_BATCH, GPU_CHECK_R18_SIZE  ResNet-18 batch and image size (256 x 224)
#   GPU_CHECK_DTYPES                      compute dtypes (default "float32 bfloat16")
#   GPU_CHECK_TRAIN_STEPS                 steps of the CIFAR run (-1: one epoch)
#   GPU_CHECK_STEP_TIMEOUT                seconds allowed per step (default 600)
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

CPU=0 DATA="" PY="" PAPER=0 BUDGET=600
for arg in "$@"; do
  case "$arg" in
    --cpu) CPU=1 ;;
    --paper_cifar) PAPER=1 ;;
    --budget_s=*) BUDGET=${arg#--budget_s=} ;;
    --data=*) DATA=${arg#--data=} ;;
    --python=*) PY=${arg#--python=} ;;
    -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg'; use [--cpu] [--python=PY]" \
            "[--paper_cifar [--budget_s=S]] --data=CIFAR.npz" >&2
       exit 2 ;;
  esac
done
DATA=${DATA/#\~/$HOME}
if [[ -z "$DATA" || ! -f "$DATA" ]]; then
  echo "gpu_check.sh: --data=CIFAR.npz is required and must exist (got '${DATA}'): an npz" \
       "with x_train, y_train, x_test, y_test (uint8 NHWC), e.g. CIFAR-10 saved with" \
       "numpy.savez" >&2
  exit 2
fi

if (( CPU )); then
  : "${GPU_CHECK_STEPS:=3}" "${GPU_CHECK_WARMUP:=1}" "${GPU_CHECK_R20_BATCH:=32}"
  : "${GPU_CHECK_R18_BATCH:=8}" "${GPU_CHECK_R18_SIZE:=64}" "${GPU_CHECK_TRAIN_STEPS:=20}"
  PY=${PY:-python}
else
  : "${GPU_CHECK_STEPS:=50}" "${GPU_CHECK_WARMUP:=5}" "${GPU_CHECK_R20_BATCH:=1024}"
  : "${GPU_CHECK_R18_BATCH:=256}" "${GPU_CHECK_R18_SIZE:=224}" "${GPU_CHECK_TRAIN_STEPS:=-1}"
fi
: "${GPU_CHECK_DTYPES:=float32 bfloat16}" "${GPU_CHECK_STEP_TIMEOUT:=600}"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
if [[ -z "$PY" ]]; then
  VENV=${VENV:-${TMPDIR:-/tmp}/irnet_gpu_venv}
  echo "== fresh venv $VENV: requirements.txt + jax[${JAX_EXTRA:-cuda12}]" >&2
  rm -rf "$VENV" && python3 -m venv "$VENV" || exit 1
  "$VENV/bin/pip" install -q --upgrade pip || exit 1
  "$VENV/bin/pip" install -q -r requirements.txt "jax[${JAX_EXTRA:-cuda12}]" || exit 1
  PY=$VENV/bin/python
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

if (( PAPER )); then
  EXTRA=()
  (( CPU )) && EXTRA=(--cpu)
  exec "$PY" experiments/paper_cifar.py --data="$DATA" --budget_s="$BUDGET" \
    --workdir="$WORK/paper_cifar" --steps_per_call="${GPU_CHECK_PAPER_K:-390}" \
    --compute_dtype="${GPU_CHECK_PAPER_DTYPE:-float32}" "${EXTRA[@]}"
fi

# Every step appends "name<TAB>json" to $WORK/results.tsv (json = its last stdout line).
FAILED=()
record() {  # record NAME LOGFILE STATUS
  local json
  json=$(tail -n 1 "$2")
  if [[ $3 -ne 0 || "$json" != \{* ]]; then
    FAILED+=("$1")
    echo "== $1 FAILED (status $3), log $2:" >&2
    tail -n 5 "$2" >&2
  else
    printf '%s\t%s\n' "$1" "$json" >> "$WORK/results.tsv"
    echo "== $1: $json" >&2
  fi
}
run_step() {  # run_step NAME CMD...
  local name=$1 log="$WORK/$1.log"; shift
  echo "== $name: $*" >&2
  timeout "$GPU_CHECK_STEP_TIMEOUT" "$@" > "$log" 2> "$log.err"
  local status=$?
  (( status == 0 )) || cat "$log.err" >> "$log"
  record "$name" "$log" "$status"
}

run_step devices "$PY" -c 'import json, jax
print(json.dumps(dict(backend=jax.default_backend(), jax_version=jax.__version__,
                      devices=[str(d) for d in jax.devices()],
                      device_kinds=sorted({d.device_kind for d in jax.devices()}))))'

# name config batch image_size num_classes
BENCHES=(
  "resnet20 cifar10_resnet20 $GPU_CHECK_R20_BATCH 32 10"
  "resnet20_fp cifar10_resnet20_fp $GPU_CHECK_R20_BATCH 32 10"
  "resnet18 imagenet_resnet18 $GPU_CHECK_R18_BATCH $GPU_CHECK_R18_SIZE 1000"
  "resnet18_fp imagenet_resnet18_fp $GPU_CHECK_R18_BATCH $GPU_CHECK_R18_SIZE 1000"
)
for bench in "${BENCHES[@]}"; do
  read -r name config batch size classes <<< "$bench"
  for dtype in $GPU_CHECK_DTYPES; do
    run_step "throughput_${name}_${dtype}" "$PY" experiments/throughput.py \
      --config="$config" --steps="$GPU_CHECK_STEPS" --warmup="$GPU_CHECK_WARMUP" \
      --num_classes="$classes" --config.batch_size="$batch" \
      --config.dataset.image_size="$size" --config.compute_dtype="$dtype"
  done
done

# One epoch (or GPU_CHECK_TRAIN_STEPS steps) of the real recipe through the launcher.
echo "== cifar10_resnet20_1epoch" >&2
timeout "$GPU_CHECK_STEP_TIMEOUT" "$PY" -m irnet_jax.main --config=cifar10_resnet20 \
  --workdir="$WORK/cifar10_run" --config.num_epochs=1 \
  --config.num_train_steps="$GPU_CHECK_TRAIN_STEPS" --config.dataset.name=npz \
  --config.dataset.path="$DATA" --config.progress_bar=False \
  > "$WORK/cifar10.log" 2>&1
status=$?
"$PY" - "$WORK/cifar10_run" > "$WORK/cifar10_summary.log" 2>&1 <<'EOF'
import json, os, sys
workdir = sys.argv[1]
with open(os.path.join(workdir, "final_metrics.json")) as f:
  final = json.load(f)
with open(os.path.join(workdir, "metrics.jsonl")) as f:
  rates = [r["images_per_sec"] for r in map(json.loads, f)
           if r["split"] == "train" and "images_per_sec" in r]
rates = rates[1:] or rates  # The first interval includes compilation.
print(json.dumps(dict(test_accuracy=final["test_accuracy"], test_loss=final["test_loss"],
                      train_steps=final["train_steps"], train_seconds=final["train_seconds"],
                      train_images_per_sec=sum(rates) / len(rates))))
EOF
summary_status=$?
(( status == 0 )) || cat "$WORK/cifar10.log" >> "$WORK/cifar10_summary.log"
record cifar10_resnet20_1epoch "$WORK/cifar10_summary.log" $(( status || summary_status ))

# The last line: every figure, keyed by step name.
python3 - "$WORK/results.tsv" "$CPU" "$WORK" "${FAILED[@]}" <<'EOF'
import json, os, sys
path, cpu, work, failed = sys.argv[1], sys.argv[2] == "1", sys.argv[3], sys.argv[4:]
out = dict(mode="cpu" if cpu else "gpu", logs=work, failed=failed)
if os.path.exists(path):
  for line in open(path):
    name, js = line.rstrip("\n").split("\t", 1)
    out[name] = json.loads(js)
print(json.dumps(out))
EOF
(( ${#FAILED[@]} == 0 ))
