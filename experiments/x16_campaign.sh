#!/usr/bin/env bash
# The issue-11 sweeps (configs/sweeps_x16.py), most informative first, each resumable: re-running
# this script skips finished cells. Order: the paper form on MNIST-1D, then on the teacher task,
# then soft routing in regime II (paper form, MNIST-1D: with the dense dispatch the sweeps use it
# costs what top-K does), then the ratio form. Results: experiments/results/x16/<name>/
# (cells/*.json, summary_<regime>.json, figures/; each run of a sweep appends to <name>.log).
# Start it with `nice -n 19 bash experiments/x16_campaign.sh`.
set -uo pipefail
cd "$(dirname "$0")/.."

sweep() {  # sweep NAME CONFIG_ARGUMENTS
  python3 run.py sweep --workdir "experiments/results/x16/$1" --config "configs/sweeps_x16.py:$2" \
    >> "experiments/results/x16/$1.log" 2>&1 || echo "$1 failed: see its log"
}

for constants in paper ratio; do
  for data in mnist1d teacher; do
    for regime in II III I; do
      for optimizer in adam sgd; do
        sweep "${regime}-${optimizer}-${constants}-${data}" \
          "regime=${regime},optimizer=${optimizer},constants=${constants},data=${data}"
      done
    done
  done
  if [ "$constants" = paper ]; then
    for optimizer in adam sgd; do
      sweep "II-${optimizer}-paper-mnist1d-soft" \
        "regime=II,optimizer=${optimizer},constants=paper,data=mnist1d,routing=soft"
    done
  fi
done
