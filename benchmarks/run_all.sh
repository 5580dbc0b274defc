#!/usr/bin/env bash
# The measurements behind benchmarks/README.md, in order. Run as root (page
# cache drops, memory cgroups) from the repository root. Big generated models
# go to $DATA (outside the repository); results to benchmarks/results/.
#
#   DATA=bench-data bash benchmarks/run_all.sh
set -euo pipefail
DATA=${DATA:-bench-data}
RES=benchmarks/results
PY=${PY:-python}

# 1. Residency curve of the shipped trained model against stock mlx-lm on a
#    stacked checkpoint holding the same bytes.
$PY -c "from mlx_lm_odmoe.tools.large_synthetic import export_stock; \
export_stock('models/tiny-qwen2-moe', '$DATA/tiny-qwen2-moe-stock-q4', force=True)"
$PY -m mlx_lm_odmoe.tools.bench --model models/tiny-qwen2-moe --stock $DATA/tiny-qwen2-moe-stock-q4 \
    --tokens 256 --reps 7 --out $RES/tiny-qwen2-moe \
    --title "tiny-qwen2-moe (trained, 4-bit): odmoe vs stock mlx-lm"
# ... and in one process, interleaved (no per-process noise):
$PY benchmarks/decode_overhead.py --model $DATA/tiny-qwen2-moe-stock-q4 \
    --budgets 100%,50%,25%,12.5% --tokens 256 --rounds 7
# ... and the Kimi-architecture model, against mlx-lm's own 4-bit conversion of
#     the trained float32 checkpoint (training/README.md makes it).
mlx_lm.convert --hf-path ${ARTIFACTS:-training/artifacts}/tiny-kimi-mlx --mlx-path $DATA/tiny-kimi-stock-q4 \
    -q --q-group-size 32 --dtype float32
$PY -m mlx_lm_odmoe.tools.bench --model models/tiny-kimi --stock $DATA/tiny-kimi-stock-q4 \
    --tokens 256 --reps 5 --out $RES/tiny-kimi --title "tiny-kimi (trained, 4-bit): odmoe vs stock mlx-lm"
# Prediction and policy online, both shipped models (results/predict/online-25pct.md).
$PY benchmarks/prefetch.py > $RES/predict/online-25pct.md

# 2. The same with Qwen1.5-MoE-A2.7B-sized experts (5.4 MB each), 8 layers,
#    a 4k vocabulary so the experts, not lm_head, dominate; cold page cache.
$PY -m mlx_lm_odmoe.tools.large_synthetic --preset qwen1.5-moe-a2.7b --layers 8 --vocab-size 4096 \
    --out $DATA/qwen15-experts-8l --stock $DATA/qwen15-experts-8l-stock
$PY -m mlx_lm_odmoe.tools.bench --model $DATA/qwen15-experts-8l --stock $DATA/qwen15-experts-8l-stock \
    --tokens 32 --reps 2 --prompt-tokens 32 --cold --out $RES/qwen15-experts-8l \
    --title "Qwen1.5-MoE-A2.7B experts (5.4 MB), 8 layers, 4k vocab (synthetic): odmoe vs stock mlx-lm, cold page cache"

# 3. Bigger than RAM: the full Qwen1.5-MoE-A2.7B shape (7.8 GB of experts) in a
#    memory cgroup at half the model's size, against stock mlx-lm and llama.cpp.
$PY -m mlx_lm_odmoe.tools.large_synthetic --preset qwen1.5-moe-a2.7b --out $DATA/qwen15-moe-synth \
    --stock $DATA/qwen15-moe-synth-stock --gguf $DATA/qwen15-moe-synth.gguf
$PY -m mlx_lm_odmoe.tools.bench --model $DATA/qwen15-moe-synth --stock $DATA/qwen15-moe-synth-stock \
    --gguf $DATA/qwen15-moe-synth.gguf --cgroup-limit 50% --budgets 2GB \
    --tokens 16 --prompt-tokens 16 --warmup-tokens 2 --reps 1 --timeout 900 \
    --out $RES/cgroup-qwen15-moe \
    --title "Bigger than RAM: Qwen1.5-MoE-A2.7B shapes (synthetic) in a memory cgroup at 50% of the model"
# ... and with no limit, for reference.
$PY -m mlx_lm_odmoe.tools.bench --model $DATA/qwen15-moe-synth --stock $DATA/qwen15-moe-synth-stock \
    --gguf $DATA/qwen15-moe-synth.gguf --budgets 100%,2GB \
    --tokens 16 --prompt-tokens 16 --warmup-tokens 2 --reps 1 --timeout 900 \
    --out $RES/unconstrained-qwen15-moe \
    --title "Same model, no memory limit (24 GB RAM, warm page cache): odmoe vs stock mlx-lm vs llama.cpp"

# 4. Expert read throughput against dd, cold cache.
$PY benchmarks/read_throughput.py --model $DATA/qwen15-moe-synth --reps 3 --out $RES/read-throughput

# 5. The forecast for the cgroup run, and for models not on disk.
$PY -m mlx_lm_odmoe.tools.doctor $DATA/qwen15-moe-synth --memory 4.47GB --budget 2GB --context 64 --headroom 0
$PY -m mlx_lm_odmoe.tools.doctor --config tests/data/kimi-k2.5.config.json --memory 128GB --disk-gbps 0.75 --compute-gbps 0.66
$PY -m mlx_lm_odmoe.tools.doctor --config tests/data/qwen2-57b-a14b.config.json --memory 24GB \
    --disk-gbps 0.75 --compute-gbps 0.66 --scale-bytes 4 --dtype-bytes 4

# 6. One MoE layer against dense layers of the same total / active parameters.
$PY benchmarks/moe_vs_dense.py --reps 5 --out $RES/moe-vs-dense

# 7. The I/O-bound regime: the trained models with their experts widened to
#    25 MB / 16 MB float32 records (~5 GB each), cold, each contender in a
#    memory cgroup of resident weights + its budget + 0.8 GB; llama.cpp on the
#    same weights in the cgroup of the 25% budget.
$PY -m mlx_lm_odmoe.tools.inflate --from models/tiny-qwen2-moe --width 8192 $DATA/qwen-wide --gguf $DATA/qwen-wide.gguf
$PY -m mlx_lm_odmoe.tools.inflate --from models/tiny-kimi --width 5120 $DATA/kimi-wide
$PY benchmarks/io_bound.py --model $DATA/qwen-wide --gguf $DATA/qwen-wide.gguf \
    --compare-prefetch 50%,25%,12.5% --variant '25%:{"prefetch_into": "staging", "prefetch_staging": 2}' \
    --tokens 48 --out $RES/io-bound/qwen-wide
$PY benchmarks/io_bound.py --model $DATA/qwen-wide --budgets 50%,25%,12.5% --compare-prefetch 25%,12.5% \
    --rounds 3 --long-prompt 0 --warm-start-budget '' --out $RES/io-bound/qwen-wide-3-rounds
$PY benchmarks/io_bound.py --model $DATA/kimi-wide --compare-prefetch 50%,25%,12.5% \
    --tokens 48 --out $RES/io-bound/kimi-wide
$PY benchmarks/io_bound.py --model $DATA/kimi-wide --budgets 50%,25%,12.5% --compare-prefetch 25%,12.5% \
    --rounds 3 --long-prompt 0 --warm-start-budget '' --out $RES/io-bound/kimi-wide-3-rounds
# Prompts read ahead: everything in one run per testbed, 3 rounds; then the
# same testbed with OpenBLAS preloaded (apt install libopenblas0-pthread).
$PY benchmarks/io_bound.py --model $DATA/qwen-wide --gguf $DATA/qwen-wide.gguf --budgets 50%,25%,12.5% \
    --compare-prefetch 25%,12.5% --rounds 3 --tokens 48 --out $RES/io-bound/qwen-wide-pipelined
$PY benchmarks/io_bound.py --model $DATA/kimi-wide --budgets 50%,25%,12.5% --compare-prefetch 25%,12.5% \
    --rounds 3 --tokens 48 --out $RES/io-bound/kimi-wide-pipelined
# Each process's own peak RSS (VmHWM), a bare process, the predictor's CPU time.
for m in qwen-wide kimi-wide; do
    $PY benchmarks/io_bound.py --model $DATA/$m --budgets 50%,25%,12.5% --compare-prefetch 25%,12.5% \
        --rounds 3 --tokens 48 --long-prompt 0 --warm-start-budget '' --out $RES/io-bound/$m-rss
done
# Prompts: resident experts run first, checksums once per shard version; OpenBLAS against llama.cpp.
$PY benchmarks/io_bound.py --model $DATA/qwen-wide --gguf $DATA/qwen-wide.gguf --blas libopenblas.so.0 \
    --budgets 25% --compare-prefetch '' --rounds 2 --tokens 48 --long-prompt 0 --warm-start-budget '' \
    --out $RES/io-bound/qwen-wide-openblas-ledger
$PY benchmarks/io_bound.py --model $DATA/qwen-wide --gguf $DATA/qwen-wide.gguf --blas libopenblas.so.0 \
    --budgets 25%,12.5% --compare-prefetch 25% --rounds 2 --tokens 48 --warm-start-budget '' \
    --out $RES/io-bound/qwen-wide-openblas
# Prompts stream into free slots; the bound counts used guesses. OpenBLAS against llama.cpp,
# then both testbeds with the wheel's BLAS, then decode variants in the OpenBLAS regime.
$PY benchmarks/io_bound.py --model $DATA/qwen-wide --gguf $DATA/qwen-wide.gguf --blas libopenblas.so.0 \
    --budgets 25%,12.5% --compare-prefetch 25%,12.5% --rounds 2 --tokens 48 --long-prompt 2048 \
    --warm-start-budget '' --out $RES/io-bound/qwen-wide-openblas-streamed
$PY benchmarks/io_bound.py --model $DATA/qwen-wide --gguf $DATA/qwen-wide.gguf --budgets 50%,25%,12.5% \
    --compare-prefetch 25%,12.5% --rounds 3 --tokens 48 --out $RES/io-bound/qwen-wide-streamed
$PY benchmarks/io_bound.py --model $DATA/kimi-wide --budgets 50%,25%,12.5% --compare-prefetch 25%,12.5% \
    --rounds 3 --tokens 48 --out $RES/io-bound/kimi-wide-streamed
$PY benchmarks/io_bound.py --model $DATA/qwen-wide --blas libopenblas.so.0 --budgets 25%,12.5% \
    --compare-prefetch 25%,12.5% --variant '25%:{"prefetch_distance": 2}' \
    --variant '12.5%:{"prefetch_distance": 2}' \
    --variant '25%:{"prefetch_into": "staging", "prefetch_staging": 2}' --rounds 2 --tokens 48 \
    --long-prompt 0 --warm-start-budget '' --out $RES/io-bound/qwen-wide-openblas-variants
$PY benchmarks/io_bound.py --model $DATA/qwen-wide --gguf $DATA/qwen-wide.gguf --blas libopenblas.so.0 \
    --budgets 25% --compare-prefetch '' --rounds 3 --tokens 48 --long-prompt 0 --warm-start-budget '' \
    --out $RES/io-bound/qwen-wide-openblas-race
