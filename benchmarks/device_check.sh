#!/usr/bin/env bash
# On a machine with one CUDA GPU, in under 8 minutes: the CUDA tests, the CPU-vs-CUDA
# agreement check and meta-step timings on both devices, and a short CUDA sinusoid training.
# Everything printed is also written to results/device_check.txt (commit it, the GPU named).
# Usage: bash benchmarks/device_check.sh   (from the repository root, the package installed)
set -uo pipefail
out=${DEVICE_CHECK_OUT:-results/device_check.txt}
mkdir -p "$(dirname "$out")"
{
  echo "# device check, $(date -u +%Y-%m-%dT%H:%MZ)"
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO GPU')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  echo "## CUDA tests"
  timeout 180 python -m pytest -q -p no:cacheprovider tests/test_distributed.py -k cuda -rs 2>&1 | tail -3
  echo "## CPU vs CUDA agreement (float64 meta-step)"
  timeout 120 python benchmarks/gpu_check.py 2>&1 | tail -6
  echo "## meta-step, CUDA"
  timeout 150 python benchmarks/meta_step.py --quick --device cuda --skip processes 2>&1 | tail -16
  echo "## meta-step, CPU (1 thread), same machine"
  timeout 90 python benchmarks/meta_step.py --quick --device cpu --skip scaling processes 2>&1 | tail -9
  echo "## short CUDA sinusoid training (500 meta-iterations)"
  rm -rf runs/device_check_train
  timeout 150 python -m pyro_bmaml train --device cuda --iterations 500 --no-progress \
    --out runs/device_check_train 2>&1 | tail -4
} 2>&1 | tee "$out"
