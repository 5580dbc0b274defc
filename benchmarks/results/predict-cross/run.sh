#!/bin/sh
# Cross-domain expert prediction (issue 16), from the repository root:
# corpora of three kinds of text, traces of both shipped models on each,
# shadow models trained without each kind and scored on it, recall over
# 1,000-token generations (online vs frozen), and the shipped shadows
# trained on all three kinds. Traces and corpora go to $ARTIFACTS; the
# models run one after the other (MODELS=tiny-kimi sh run.sh for one).
set -e
OUT=benchmarks/results/predict-cross
A=${ARTIFACTS:-artifacts}
PY=${PY:-.venv/bin/python}
KINDS="code man legal"

if [ ! -f "$A/kinds/kinds.json" ]; then
  $PY training/text_kinds.py --tokenizer models/tiny-qwen2-moe --out "$A/kinds"
  cp "$A/kinds/kinds.json" "$OUT/kinds.json"
fi

for m in ${MODELS:-tiny-qwen2-moe tiny-kimi}; do
  args=""
  for k in $KINDS; do
    $PY -m mlx_lm_odmoe.research.collect "models/$m" --out "$A/traces/$m-$k.npz" \
      --heldout "$A/kinds/$k.npy" --chunks 32 --generate 32 --batch 8 --quiet
    args="$args --kind $k=$A/traces/$m-$k.npz"
  done
  $PY -m mlx_lm_odmoe.research.cross_domain "models/$m" $args --epochs 10 \
    --save "$A/shadows/$m" --json "$OUT/cross-$m.json" --markdown "$OUT/cross-$m.md"
  for k in $KINDS; do
    $PY -m mlx_lm_odmoe.research.online_eval "models/$m" --heldout "$A/kinds/$k.npy" \
      --shadow "$A/shadows/$m/without-$k" --tokens 1000 --prompts 4 \
      --save-trace "$A/traces/$m-$k-long.npz" --json "$OUT/online-$m-$k.json"
  done
  $PY -m mlx_lm_odmoe.research.train_shadow "models/$m" --force --epochs 20 \
    --generated-weight 3 --traces $(for k in $KINDS; do printf '%s ' "$A/traces/$m-$k.npz"; done)
done
# The ceiling at distance 1: the next router on the current layer's whole output.
zcat /usr/share/man/man1/ls.1.gz > $A/ls.1
for m in tiny-kimi tiny-qwen2-moe; do
    $PY benchmarks/lookahead_ceiling.py --model models/$m /usr/share/common-licenses/GPL-3 \
        mlx_lm_odmoe/store/cached.py $A/ls.1
done
# Next-attention (no training: every kind held out), scored live in the block.
for m in tiny-qwen2-moe tiny-kimi; do
    $PY -m mlx_lm_odmoe.research.live_recall models/$m $(for k in $KINDS; do printf -- '--kind %s=%s ' $k "$A/kinds/$k.npy"; done) \
        --sequences 4 --steps 128 --json "$OUT/live-$m.json" --markdown "$OUT/live-$m.md"
done
