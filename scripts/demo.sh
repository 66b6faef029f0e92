#!/usr/bin/env bash
# Sets up ./.venv (if needed), then indexes a real collection on an embedded local Ray and runs
# evaluated global search with whole-image and 40%-centre-crop queries.
# Collection: ../shared/data/instance-mini when present, else a generated synthetic one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} RAY_USAGE_STATS_ENABLED=0
PY=.venv/bin/python
OUT=${OUT:-out/demo}
COLLECTION=${COLLECTION:-../shared/data/instance-mini/images.csv}
if [ ! -f "$COLLECTION" ]; then
  COLLECTION=$($PY -m jobs.synthetic --out "$OUT/synthetic")
fi
$PY -m jobs.index --collection "$COLLECTION" --out "$OUT/index" "$@"
for crop in whole 0.4; do
  args=(); [ "$crop" != whole ] && args=(--center-crop "$crop")
  $PY -m jobs.search --index "$OUT/index" --queries "$COLLECTION" --out "$OUT/search-$crop" --topk 1000 "${args[@]}"
  $PY -m jobs.evaluate --results "$OUT/search-$crop" --ground-truth "$COLLECTION"
done
echo
echo "index:   $OUT/index   (summary-index.json, features/, global/)"
echo "results: $OUT/search-whole/{results.parquet,metrics.json}  $OUT/search-0.4/{results.parquet,metrics.json}"
echo "reports: $OUT/search-whole/report.html  $OUT/search-0.4/report.html"
