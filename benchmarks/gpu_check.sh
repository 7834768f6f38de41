#!/usr/bin/env bash
# One lease of a CUDA machine (~8 minutes): the paper profile's training throughput (ViT-B/16,
# 256x128, fusion 2x768, bf16) as the training loop takes its steps -- model and losses compiled
# as one graph under CUDA graphs (train.compile: reduce-overhead) -- on its own and fed by the real
# LMDB loader with both decode paths (worker: JPEG decode + augmentation in the loader processes;
# device: nvJPEG + batched augmentation on the GPU), a torch.profiler table per stage, the CUDA
# tests, and the former compile scope (model alone) for comparison. Results land in $OUT.
#   bash benchmarks/gpu_check.sh        # needs python3 with torch+CUDA; lmdb and torchcodec from .whl/
#   if missing (pip download --no-deps -d .whl lmdb torchcodec==0.17.0, with the versions of constraints.txt)
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DVC_NO_ANALYTICS=1 CLEARML_OFFLINE_MODE=1
if ! python3 -c "import lmdb, torchcodec" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=.:${PYTHONPATH:-}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; nproc;
  python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.version.cuda)"; } \
  2>&1 | tee "$OUT/machine.txt"
bench="python3 benchmarks/train_throughput.py --params configs/paper.yaml --device cuda --text-dim 768
       --steps 30 --warmup 5 --ids 256 --per-id 16 --workers 12 --compile reduce-overhead"
loaders="--loader --decode worker device --profile-dir $OUT"
# pretraining with captions (batch 128) and fine-tuning (batch 64): the loop's compiled step, compute
# alone, then the real loader (4,096 random 256x128 JPEGs, the paper's augmentation) on each decode path
SECONDS=0
timeout 200 $bench --stage pretrain $loaders --json "$OUT/pretrain_step_cudagraphs.json" 2>&1 | tee -a "$OUT/bench.log" | tail -4
echo "pretrain: ${SECONDS}s"; SECONDS=0
timeout 170 $bench --stage finetune $loaders --json "$OUT/finetune_step_cudagraphs.json" 2>&1 | tee -a "$OUT/bench.log" | tail -4
echo "finetune: ${SECONDS}s"; SECONDS=0
# the training loop's CUDA path: compiled step vs eager, bf16 autocast, NaN stop; nvJPEG vs the CPU decoder
timeout 100 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_train.py tests/test_device_augment.py \
  -k "cuda_graphs or loss_step or image_only or loss_decreases or non_finite or cuda_batch" 2>&1 \
  | tail -15 | tee "$OUT/pytest_cuda.txt"
echo "pytest: ${SECONDS}s"; SECONDS=0
# nvJPEG through torchvision (what train.decode=device uses) vs TorchCodec: the same pixels? speed?
# (docs/data_path.md, "Image decoder": the device path moves to TorchCodec when they are equal)
timeout 90 python3 benchmarks/decoder_check.py --images 2000 --repeats 3 > "$OUT/decoder_check.json" 2>&1
tail -c 600 "$OUT/decoder_check.json"; echo "decoder check: ${SECONDS}s"; SECONDS=0
# the compile scope before 2026-12-04 (the model alone, losses eager), compute only: the A/B
timeout 110 $bench --stage finetune --scope model --json "$OUT/finetune_model_cudagraphs.json" 2>&1 | tee -a "$OUT/bench.log" | tail -4
echo "finetune, model scope: ${SECONDS}s"
