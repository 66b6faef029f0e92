#!/usr/bin/env bash
# The README's instance-mini figures beyond the demo's comparison table, on the demo's index
# (run ./scripts/demo.sh first). Prints one "name  mAP-whole  mAP-crop" line per setting.
#   bash benchmarks/instance_mini_tables.sh [rerank|learned|whitening|max-side|how]...   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} RAY_USAGE_STATS_ENABLED=0
PY=.venv/bin/python
OUT=${OUT:-out/demo}
C=${COLLECTION:-../shared/data/instance-mini/images.csv}
T=${TABLES:-out/tables}
mkdir -p "$T"

map() {  # map INDEX NAME SEARCH-ARGS… : mAP of whole and 40%-crop queries
  local index=$1 name=$2; shift 2
  local line="$name"
  for crop in whole 0.4; do
    local args=(); [ "$crop" != whole ] && args=(--center-crop "$crop")
    local res="$T/$name-$crop"
    $PY -m jobs.search --index "$index" --queries "$C" --out "$res" --topk 1000 "$@" "${args[@]}" > "$res.log" 2>&1
    $PY -m jobs.evaluate --results "$res" --ground-truth "$C" --set report.enabled=false >> "$res.log" 2>&1
    line+="  $($PY -c "import json,sys; print(f'{100 * json.load(open(sys.argv[1]))[\"mAP\"]:.2f}')" "$res/metrics.json")"
  done
  echo "$line"
}

what=("$@"); [ ${#what[@]} -eq 0 ] && what=(rerank learned whitening max-side how)
for w in "${what[@]}"; do
  case $w in
  rerank)  # the re-rankings the demo leaves out
    for method in global asmk fused; do
      for rerank in truncated-dfs fsr; do map "$OUT/index" "$method-$rerank" --method "$method" --rerank "$rerank"; done
    done;;
  learned)  # GSS, GRAD-Net (trained on the demo's index first; K = 10: the graph's lists) and CAS next to diffusion
    $PY -m jobs.train_reranker --index "$OUT/index" --method gss > "$T/train-gss.log" 2>&1
    $PY -m jobs.train_reranker --index "$OUT/index" --method gradnet --set gradnet.k=10 > "$T/train-gradnet.log" 2>&1
    for method in global asmk fused; do
      for rerank in none dfs fsr hybrid gss gradnet cas; do map "$OUT/index" "$method-$rerank" --method "$method" --rerank "$rerank"; done
    done;;
  whitening)  # global PCA-whitening learned on the collection itself (a copy of the index's global stage)
    W="$T/whiten-index"; rm -rf "$W"; mkdir -p "$W"
    cp -r "$OUT/index/features" "$OUT/index/images.parquet" "$OUT/index/index.json" "$W/"
    for setting in "128 1" "64 1" "128 0.5" "128 0" "64 0"; do
      set -- $setting
      $PY -m jobs.index --collection "$C" --out "$W" --set stages=[global] --global-whiten-dim "$1" \
        --set global_whiten_shrinkage="$2" --set global_whiten_images=186 > "$T/whiten.log" 2>&1
      map "$W" "pcaw-D$1-s$2"
    done;;
  max-side)  # global descriptor at 512 px instead of 1024
    $PY -m jobs.index --collection "$C" --out "$T/side512" --set stages=[extract,global] \
      --set describe.global_max_side=512 > "$T/side512.log" 2>&1
    grep -o '"extract": [0-9.]*' "$T/side512/summary-index.json"
    map "$T/side512" "global-512";;
  how)  # HOW-style deep local features (EfficientNet-Lite0), ASMK* on 40% crops
    for layer in block10 head; do
      H="$T/how-$layer"
      $PY -m jobs.index --collection "$C" --out "$H" --set stages=[extract,global,codebook,asmk] \
        --set describe.local=how --set describe.local_layer=$layer --set codebook.k=4096 > "$H.log" 2>&1
      map "$H" "how-$layer-asmk" --method asmk
    done;;
  esac
done
