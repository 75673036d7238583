#!/usr/bin/env bash
# Extraction throughput of this checkout against another version of the code, measured on one
# machine in one session, alternated (A B A B ...) after a throwaway warm-up run, so drift of the
# machine (clocks, page cache, other tenants) falls on both sides alike.
#
#   git archive c122a6f usae_core benchmarks/extract_throughput.py | tar -x -C /tmp/old
#   bash benchmarks/compare_extraction.sh /tmp/old 3 --device cuda --random-init --compile \
#       --images /root/imgs --store-dir /dev/shm \
#       --models timm:vit_small_patch14_dinov2,timm:vit_base_patch16_siglip_224,timm:vit_base_patch16_224
#
# Arguments: the other version's folder (holding usae_core/ and benchmarks/extract_throughput.py),
# the number of rounds, then extract_throughput.py's own options, passed to both sides. Each run's
# JSON goes to $OUT (default ./compare-extraction/); the last lines are one row per run.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 OTHER_CODE_DIR ROUNDS [extract_throughput.py options...]" >&2
  exit 2
fi
other=$(cd "$1" && pwd)
rounds=$2
shift 2
[[ -f "$other/benchmarks/extract_throughput.py" && -d "$other/usae_core" ]] || {
  echo "$other holds no usae_core/ and benchmarks/extract_throughput.py (see the usage above)" >&2
  exit 2
}
here=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-compare-extraction}
mkdir -p "$out"
out=$(cd "$out" && pwd)

run() {  # run NAME CODE_DIR OPTIONS...: one measurement of the code in CODE_DIR
  local name=$1 code=$2
  shift 2
  local path="$code${PYTHONPATH:+:$PYTHONPATH}"
  local used
  # From / : `python -c` puts the working directory first on the path, and in a checkout that
  # would import the checkout's usae_core instead of $code's.
  used=$(cd / && PYTHONPATH="$path" python -c 'import usae_core; print(usae_core.__file__)')
  [[ "$used" == "$code"/* ]] || { echo "run $name would import $used, not the code in $code" >&2; exit 1; }
  (cd / && PYTHONPATH="$path" python "$code/benchmarks/extract_throughput.py" "$@" \
    --json "$out/$name.json") > "$out/$name.log" 2>&1 || { echo "run $name failed; see $out/$name.log" >&2; exit 1; }
}

run warmup "$here" "${@}"  # compiles, fills caches; not counted
for i in $(seq 1 "$rounds"); do
  run "other-$i" "$other" "${@}"
  run "this-$i" "$here" "${@}"
done

python - "$out" "$rounds" <<'EOF'
import json, sys
from pathlib import Path

out, rounds = Path(sys.argv[1]), int(sys.argv[2])
print(f"{'run':<10} {'extract img/s':>14} {'bare forward img/s':>19} {'ratio':>6}")
for i in range(1, rounds + 1):
    for side in ("other", "this"):
        r = json.loads((out / f"{side}-{i}.json").read_text())
        print(f"{side + '-' + str(i):<10} {r['extract_img_s']:>14,.0f} {r['forward_img_s']['all']:>19,.0f} "
              f"{r['extract_vs_forward']:>6.3f}")
EOF
