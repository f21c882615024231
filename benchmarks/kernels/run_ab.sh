#!/usr/bin/env bash
# A/B of the kernels against a baseline copy of csrc_triton in .baseline/ (an ignored folder carried to
# the GPU: git archive <commit> csrc_triton | tar -x -C .baseline), one device call per side, back to back
# on one machine:
#   bash benchmarks/kernels/run_ab.sh old     # the baseline's times (kept in /tmp/ab for the next call)
#   bash benchmarks/kernels/run_ab.sh new     # this tree's, the merged ab_<card>.json, graph and PDL checks
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/ab-out}; mkdir -p "$out" /tmp/ab
export PYTHONUNBUFFERED=1
case "$1" in
  old) PYTHONPATH="$PWD/.baseline" python3 benchmarks/kernels/compare.py --tag old --out /tmp/ab
       cp /tmp/ab/ab_old.json "$out/" ;;
  new) python3 benchmarks/kernels/compare.py --tag new --out /tmp/ab
       cp /tmp/ab/ab_new.json "$out/"
       python3 benchmarks/kernels/compare.py --merge /tmp/ab/ab_old.json /tmp/ab/ab_new.json --out "$out"
       python3 benchmarks/kernels/graph_check.py --out "$out" --tag "$(python3 -c 'import torch; print(torch.cuda.get_device_name().split()[1].lower())')"
       python3 benchmarks/kernels/pdl_check.py --out "$out" ;;
  *) echo "usage: run_ab.sh old|new" >&2; exit 2 ;;
esac
