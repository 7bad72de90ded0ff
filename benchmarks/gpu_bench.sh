#!/usr/bin/env bash
# The GPU rows of docs/performance.md: random-init Llama shapes, batch 32 (and 8) x 128 tokens, prompt 256, top-K 32.
#   bash benchmarks/gpu_bench.sh OUTDIR
set -u
out=${1:-bench_out}
mkdir -p "$out"
export PYTHONPATH=src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$out/gpu.txt"
for spec in "llama-8b 32 naive,mule,sft,mule_nocache" "llama-8b 8 naive,mule,sft,mule_nocache" \
            "llama-3b 32 naive,mule,sft" "llama-1b 32 naive,mule,sft"; do
    set -- $spec
    python3 benchmarks/step_bench.py --shape "$1" --batch "$2" --variants "$3" --steps 5 --warmup 2 \
        --json "$out/$1-b$2.json" 2>&1
done
