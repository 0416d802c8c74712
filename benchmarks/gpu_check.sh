#!/usr/bin/env bash
# GPU check: rlhf-pg vs TRL GRPOTrainer, completion tokens/s and peak GPU memory, bf16 (benchmarks/README.md).
#   bash benchmarks/gpu_check.sh                 # from the repository root, on one NVIDIA GPU; < 8 minutes
#   bash benchmarks/gpu_check.sh --device cpu --dtype fp32 --steps 1 --warmup 1 --layers 2   # CPU smoke test
#   bash benchmarks/gpu_check.sh --vllm          # also ours with rollout.engine: vllm vs TRL use_vllm=True (colocate)
# Needs a CUDA torch with transformers, accelerate, datasets, peft and trl; installs nothing, no internet.
set -euo pipefail
export HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
export PYTHONPATH=.
exec python benchmarks/gpu_check.py "$@"
