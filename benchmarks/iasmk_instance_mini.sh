#!/usr/bin/env bash
# ASMK* vs i-ASMK* on instance-mini with the queries left out of the offline step (seed 002 L7463-7476).
#   bash benchmarks/iasmk_instance_mini.sh [OUT] [--tau-g N …]   (extra arguments go to jobs.discover)
# Split: in every group of two or more images, every fifth image (at least one) is a query and takes
# no part in indexing, codebook or discovery; the other images (and the ungrouped distractors) are
# the database. Prints the discovery statistics, then mAP of asmk / iasmk / fused / fused-iasmk on
# whole and 40%-cropped queries.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} RAY_USAGE_STATS_ENABLED=0
PY=.venv/bin/python
OUT=${1:-out/iasmk}; shift || true
C=${COLLECTION:-../shared/data/instance-mini/images.csv}
mkdir -p "$OUT/search"
$PY - "$C" "$OUT" <<'EOF'
import os, sys
import pandas as pd
c, out = sys.argv[1], sys.argv[2]
df = pd.read_csv(c)
df["file"] = [os.path.abspath(os.path.join(os.path.dirname(c), f)) for f in df["file"]]
df = df.sort_values("file").reset_index(drop=True)
rank = df.groupby("group").cumcount()
size = df.groupby("group")["file"].transform("size")
query = (size >= 2) & (rank % 5 == 0)
df[~query].to_csv(f"{out}/database.csv", index=False)
df[query].to_csv(f"{out}/queries.csv", index=False)
print(f"split: {int((~query).sum())} database images, {int(query.sum())} queries from {df[query].group.nunique()} groups")
EOF
$PY -m jobs.index --collection "$OUT/database.csv" --out "$OUT/index" --set stages=[extract,global,codebook,asmk] \
  > "$OUT/index.log" 2>&1
$PY -m jobs.discover --index "$OUT/index" --set stages=[iasmk] "$@" > "$OUT/discover.log" 2>&1
$PY -c "import json,sys; d=json.load(open(sys.argv[1])); s=d['iasmk']; t=d['timings_s']
print(json.dumps(s)); print('discovery time per stage (s):', t)" "$OUT/index/summary-discover.json"
for crop in whole 0.4; do
  args=(); [ "$crop" != whole ] && args=(--center-crop "$crop")
  line="$crop"
  for method in asmk iasmk fused fused-iasmk; do
    res="$OUT/search/$crop-$method"
    $PY -m jobs.search --index "$OUT/index" --queries "$OUT/queries.csv" --out "$res" --topk 1000 --method "$method" \
      "${args[@]}" > "$res.log" 2>&1
    $PY -m jobs.evaluate --results "$res" --ground-truth "$C" --set report.enabled=false >> "$res.log" 2>&1
    line+="  $method $($PY -c "import json,sys; print(f'{100 * json.load(open(sys.argv[1]))[\"mAP\"]:.2f}')" "$res/metrics.json")"
  done
  echo "$line"
done
