#!/usr/bin/env bash
# Object discovery by graph centrality (OS.egm) vs plain GeM on instance-mini, queries left out of the
# offline step (the split of benchmarks/iasmk_instance_mini.sh: every fifth image of each group is a query).
#   bash benchmarks/objects_instance_mini.sh [OUT] [--set objects.params.k=20 …]   (extra arguments go to jobs.discover)
# Reuses OUT/index when benchmarks/iasmk_instance_mini.sh built it. Prints the stage's statistics and
# times, then mAP of global / os, without and with αQE, on whole and 40%-cropped queries
# (METHODS="os" RERANKS="none" for fewer searches).
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} RAY_USAGE_STATS_ENABLED=0
PY=.venv/bin/python
OUT=${1:-out/iasmk}; shift || true
C=${COLLECTION:-../shared/data/instance-mini/images.csv}
if [ ! -f "$OUT/index/global/ids.npy" ]; then
  COLLECTION="$C" bash benchmarks/iasmk_instance_mini.sh "$OUT" > /dev/null
fi
mkdir -p "$OUT/search"
$PY -m jobs.discover --index "$OUT/index" --set stages=[objects] "$@" > "$OUT/objects.log" 2>&1
$PY -c "import json,sys; d=json.load(open(sys.argv[1])); o=d['objects']
print('regions', o['regions'], 'images', o['images'], 'regions per image and scale', round(o['regions_per_image_scale'], 2))
print('counts', json.dumps(d['counts'])); print('objects time per stage (s):', d['timings_s'])" "$OUT/index/summary-discover.json"
for crop in whole 0.4; do
  args=(); [ "$crop" != whole ] && args=(--center-crop "$crop")
  line="$crop"
  for method in ${METHODS:-global os}; do
    for rerank in ${RERANKS:-none alpha-qe}; do
      res="$OUT/search/$crop-$method-$rerank"
      $PY -m jobs.search --index "$OUT/index" --queries "$OUT/queries.csv" --out "$res" --topk 1000 --method "$method" \
        --rerank "$rerank" --set rerank_params.qe_n=2 "${args[@]}" > "$res.log" 2>&1
      $PY -m jobs.evaluate --results "$res" --ground-truth "$C" --set report.enabled=false >> "$res.log" 2>&1
      line+="  $method/$rerank $($PY -c "import json,sys; print(f'{100 * json.load(open(sys.argv[1]))[\"mAP\"]:.2f}')" "$res/metrics.json")"
    done
  done
  echo "$line"
done
