#!/usr/bin/env bash
# Alternating training-throughput runs of ResNet-20 1w1a (batch 128, 20 timed steps):
# PyTorch 2.13 CPU (experiments/torch_reference.py) without and with glibc huge pages,
# irnet_jax as the launcher runs it (huge pages, see irnet_jax/hugepages.py) and without.
#
#   TORCH_PYTHON=/path/to/venv-with-torch/bin/python bash experiments/throughput_vs_pytorch.sh [ROUNDS]
#
# One line per run: a label, then the script's JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_PYTHON=${TORCH_PYTHON:?set TORCH_PYTHON to a python with torch==2.13.0 installed}
HUGE=glibc.malloc.hugetlb=1
torch_bench() { "$TORCH_PYTHON" experiments/torch_reference.py bench --batch 128 --steps 20 --threads 2 2>/dev/null | tail -1; }
jax_bench() { python experiments/throughput.py --config=cifar10_resnet20 --steps=20 2>/dev/null | tail -1; }
for _ in $(seq 1 "${1:-3}"); do
  echo "torch_plain $(torch_bench)"
  echo "jax_default $(jax_bench)"
  echo "torch_huge $(GLIBC_TUNABLES=$HUGE torch_bench)"
  echo "jax_nohuge $(IRNET_JAX_HUGEPAGES=0 jax_bench)"
done
