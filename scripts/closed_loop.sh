#!/usr/bin/env bash
# The closed loop: the pipeline improves its own global descriptor without labels.
#   scripts/closed_loop.sh COLLECTION OUT
# 1. index COLLECTION into OUT/index (resumes: a rerun skips what is built);
# 2. before: global search of every image's 40% centre crop, evaluated against COLLECTION's groups;
# 3. discover (i-ASMK* components, centrality) and mine training pairs (OUT/pairs) — no labels used;
# 4. learn the GeM paper's whitening Lw from the mined pairs and re-index the global descriptors;
# 5. after: the same search and evaluation.
# The last line is "mAP before B after A" (fractions in [0, 1]). GRAPH_K (default 10: small collections,
# see scripts/demo.sh) sets the kNN graph the miner walks; LW_DIM (default 64) Lw's dimension. Lw's
# dimension, regularisation (jobs.index global_whiten_reg = 10) and negatives (random pairs) were chosen by
# leave-one-group-out cross-validation on instance-mini (benchmarks/lw_cv.py).
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: scripts/closed_loop.sh COLLECTION OUT" >&2; exit 2; }
C=$1 OUT=$2
cd "$(dirname "$0")/.."
bash scripts/setup.sh >&2
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} RAY_USAGE_STATS_ENABLED=0
PY=.venv/bin/python
mkdir -p "$OUT"
log() { echo "[closed-loop] $(date +%H:%M:%S) $*" >&2; }
log "every job's output goes to $OUT/loop.log (tail -f it to follow); steps below"
map() {  # map NAME: global search of 40% crops, evaluated; prints the mAP
  log "search and evaluate ($1): 40% crops, global"
  $PY -m jobs.search --index "$OUT/index" --queries "$C" --out "$OUT/$1" --topk 1000 --center-crop 0.4 >> "$OUT/loop.log" 2>&1
  $PY -m jobs.evaluate --results "$OUT/$1" --ground-truth "$C" >> "$OUT/loop.log" 2>&1
  $PY -c "import json,sys; print(f'{json.load(open(sys.argv[1]))[\"mAP\"]:.4f}')" "$OUT/$1/metrics.json"
}
log "index $C"
$PY -m jobs.index --collection "$C" --out "$OUT/index" --set graph.k="${GRAPH_K:-10}" --set spectral.rank=0 \
  --set global_whiten_dim=null >> "$OUT/loop.log" 2>&1
before=$(map before)
log "before: mAP $before"
log "discover: i-ASMK* components and graph centrality"
$PY -m jobs.discover --index "$OUT/index" >> "$OUT/loop.log" 2>&1
log "mine training pairs into $OUT/pairs"
$PY -m jobs.mine --index "$OUT/index" --out "$OUT/pairs" --set anchor_components=all >> "$OUT/loop.log" 2>&1
log "learned whitening from $(ls "$OUT/pairs/parts" | grep -c parquet) part(s) of pairs; re-indexing the global descriptors"
$PY -m jobs.index --collection "$C" --out "$OUT/index" --set stages=[global] --set global_whiten_pairs="$OUT/pairs" \
  --global-whiten-dim "${LW_DIM:-64}" >> "$OUT/loop.log" 2>&1
after=$(map after)
log "done; log: $OUT/loop.log"
echo "mAP before $before after $after"
