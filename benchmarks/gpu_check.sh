#!/usr/bin/env bash
# One lease of a CUDA machine: the paper profile's training throughput (ViT-B/16, 256x128, bf16),
# compute alone and with the real LMDB loader, eager and torch.compile'd, plus the CUDA training
# path of the test suite. Results land in $OUT (or ./gpu_out).
#   bash benchmarks/gpu_check.sh        # needs python3 with torch+CUDA; lmdb from .whl/ if missing
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DVC_NO_ANALYTICS=1 CLEARML_OFFLINE_MODE=1
if ! python3 -c "import lmdb" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=.:${PYTHONPATH:-}
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv; nproc;
  python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.version.cuda)"; } \
  2>&1 | tee "$OUT/machine.txt"
bench="python3 benchmarks/train_throughput.py --params configs/paper.yaml --device cuda --text-dim 768"
# eager, both stages, model compute and the real loader (8 workers, 4096 random JPEGs 256x128)
timeout 150 $bench --loader --steps 40 --warmup 10 --ids 256 --per-id 16 --workers 8 \
  --json "$OUT/paper_bf16_eager.json" 2>&1 | tail -30
# torch.compile: fine-tuning, compute alone and with the loader on 12 workers
timeout 200 $bench --stage finetune --compile --loader --steps 40 --warmup 5 --ids 256 --per-id 16 --workers 12 \
  --json "$OUT/paper_bf16_compiled.json" 2>&1 | tail -20
# CUDA graphs (compile mode reduce-overhead): does the launch-bound batch of 64 reach the target?
timeout 200 $bench --stage finetune --compile reduce-overhead --loader --steps 40 --warmup 5 --ids 256 \
  --per-id 16 --workers 8 --json "$OUT/paper_bf16_cudagraphs.json" 2>&1 | tail -20
# train.decode=device (workers only read the bytes; nvJPEG + batched augmentation on the GPU):
# pretraining eager, fine-tuning under CUDA graphs, both with the real loader
timeout 150 $bench --stage pretrain --decode device --loader --steps 40 --warmup 10 --ids 256 --per-id 16 \
  --workers 4 --json "$OUT/paper_bf16_pretrain_decode_device.json" 2>&1 | tail -20
timeout 200 $bench --stage finetune --decode device --compile reduce-overhead --loader --steps 40 --warmup 5 \
  --ids 256 --per-id 16 --workers 4 --json "$OUT/paper_bf16_cudagraphs_decode_device.json" 2>&1 | tail -20
# the training loop's CUDA path (bf16 autocast, checkpoints, NaN stop) and nvJPEG against the CPU decoder
timeout 60 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_train.py tests/test_device_augment.py \
  -k "image_only or loss_decreases or non_finite or cuda_batch" 2>&1 | tail -15 | tee "$OUT/pytest_cuda.txt"
