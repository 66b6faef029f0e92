#!/usr/bin/env bash
# The closed loop's effect on every search it feeds: mAP before / after Lw learned from mined pairs, for
# global and fused search, without re-ranking, with αQE (n = 2, our cross-validated default, and the
# seeds' n = 50) and with dfs on a kNN graph rebuilt on the descriptors of each state; whole images and
# 40% centre crops.
#   bash benchmarks/closed_loop_table.sh COLLECTION OUT     (after scripts/closed_loop.sh COLLECTION OUT)
# Re-indexes OUT/index's global stage and graph twice (raw, then Lw from OUT/pairs, the state the loop
# leaves) and prints one Markdown row per search.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: benchmarks/closed_loop_table.sh COLLECTION OUT" >&2; exit 2; }
C=$1 OUT=$2
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} RAY_USAGE_STATS_ENABLED=0
PY=.venv/bin/python
reindex() {  # reindex [Lw arguments…]: global descriptors and their kNN graph
  $PY -m jobs.index --collection "$C" --out "$OUT/index" --set stages=[global,graph] --set graph.k="${GRAPH_K:-10}" \
    --set spectral.rank=0 "$@" >> "$OUT/table.log" 2>&1
}
searches() {  # searches STATE: one mAP per (crop, method, re-ranking), as "key value" lines
  for crop in whole 0.4; do
    args=(); [ "$crop" != whole ] && args=(--center-crop "$crop")
    for method in global fused; do
      for rr in none "alpha-qe --set rerank_params.qe_n=2" "alpha-qe --set rerank_params.qe_n=50" dfs; do
        name="$1-$crop-$method-${rr// /_}"; name=${name//[^A-Za-z0-9_.=-]/}
        $PY -m jobs.search --index "$OUT/index" --queries "$C" --out "$OUT/table/$name" --topk 1000 --method "$method" \
          --rerank $rr "${args[@]}" >> "$OUT/table.log" 2>&1
        $PY -m jobs.evaluate --results "$OUT/table/$name" --ground-truth "$C" --set report.enabled=false >> "$OUT/table.log" 2>&1
        echo "$crop|$method|${rr/ --set rerank_params./ }|$($PY -c "import json,sys; print(f'{100 * json.load(open(sys.argv[1]))[\"mAP\"]:.2f}')" "$OUT/table/$name/metrics.json")"
      done
    done
  done
}
mkdir -p "$OUT/table"
reindex --set global_whiten_dim=null
searches before > "$OUT/table/before.txt"
reindex --set global_whiten_pairs="$OUT/pairs" --global-whiten-dim "${LW_DIM:-64}"
searches after > "$OUT/table/after.txt"
echo "| queries | method | re-ranking | mAP before | mAP after | change |"
echo "|---|---|---|---|---|---|"
paste -d'|' "$OUT/table/before.txt" <(cut -d'|' -f4 "$OUT/table/after.txt") |
  awk -F'|' '{printf "| %s | %s | %s | %s | %s | %+.2f |\n", $1, $2, $3, $4, $5, $5 - $4}'
