#!/usr/bin/env bash
# The checks that need a CUDA device, as one command for a machine with a GPU (e.g. the `device` tool's
# `run`): the GPU tests (100 steps under torch.cuda.set_sync_debug_mode("error"), the CUDA checksum, GPT-2-small-sized
# in bfloat16 with gradwatch.clip_grad_norm_ under sync-debug "error"; the guard skipping on the device with fused
# AdamW + GradScaler("cuda") and capturable AdamW under sync-debug "error", bit for bit like a run without the bad
# batches), the overhead bench on CUDA (GPT-2-small-sized in bfloat16 and the MLP: defaults, guard="skip", full
# statistics every step, wandb.watch(log="all") when wandb is installed; then the same with the loop clipping), and
# the agent's device operations and launch-side CPU per step on MLPs of 10, 100 and 1,000 modules. Results go to
# $OUT (default ./gpu-results): gpu.txt (the card), install.txt, gpu-tests.txt, gpu-stacked-tests.txt,
# overhead-cuda.txt/.json, overhead-cuda-clip.txt/.json, agent-ops-cuda.txt/.json. Report the card's name (gpu.txt)
# with every figure.
#
# It uses the machine's own python3 with its torch; gradwatch's other needs (grpcio, protobuf, numpy,
# prometheus-client, PyYAML, pytest, hypothesis) must be installed there already or carried as wheels.
# ROUNDS (default 5) and MODELS (default gpt2s,mlp) size the bench to the time available.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
py="${PYTHON:-python3}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# Deterministic cuBLAS workspaces: the guard's exactness test compares two runs' weights bit for bit.
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
    >> "$out/gpu.txt" 2>&1
"$py" -m pip show grpcio protobuf numpy prometheus-client pyyaml pytest hypothesis 2>&1 | grep -E "^(Name|Version|WARNING)" \
    >> "$out/gpu.txt"
"$py" -m pip install --no-deps --no-build-isolation --no-index -e . > "$out/install.txt" 2>&1 \
    || { echo "install failed: see install.txt"; tail -20 "$out/install.txt"; exit 1; }
status=0
"$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_agent_gpu.py tests/test_guard_gpu.py 2>&1 | tee "$out/gpu-tests.txt" || status=1
# Full-statistics values by same-shape stacks equal those of one tensor at a time, on CUDA too (agent/stacks.py).
"$py" -m pytest -q -p no:cacheprovider tests/test_agent_stacked_stats.py tests/test_agent_stacked_activations.py 2>&1 \
    | tee "$out/gpu-stacked-tests.txt" || status=1
variants=none,gradwatch,gradwatch-guard,gradwatch-nohooks,gradwatch-full,gradwatch-fixed,anomaly
"$py" -c "import wandb" 2>/dev/null && variants="$variants,wandb"
"$py" bench/agent_overhead.py --device cuda --bf16 --models "${MODELS:-gpt2s,mlp}" --rounds "${ROUNDS:-5}" \
    --variants "$variants" --json "$out/overhead-cuda.json" 2>&1 | tee "$out/overhead-cuda.txt" || status=1
"$py" bench/agent_overhead.py --device cuda --bf16 --models "${MODELS:-gpt2s,mlp}" --rounds "${ROUNDS:-5}" \
    --variants none,gradwatch --clip 1.0 --json "$out/overhead-cuda-clip.json" 2>&1 \
    | tee "$out/overhead-cuda-clip.txt" || status=1
"$py" bench/agent_ops.py --device cuda --rounds 2 --json "$out/agent-ops-cuda.json" 2>&1 \
    | tee "$out/agent-ops-cuda.txt" || status=1
cat "$out/gpu.txt"
exit "$status"
