#!/usr/bin/env bash
# The issue-11 sweeps (configs/sweeps_x16.py), most informative first, each resumable: re-running
# this script skips finished cells. Order: the paper form on MNIST-1D, then on the teacher task, then
# the ratio form. Results: experiments/results/x16/<name>/ (cells/*.json,
# summary_<regime>.json, figures/; each run of a sweep appends to <name>.log).
# Start it with `nice -n 19 bash experiments/x16_campaign.sh`.
set -uo pipefail
cd "$(dirname "$0")/.."
for constants in paper ratio; do
  for data in mnist1d teacher; do
    for regime in II III I; do
      for optimizer in adam sgd; do
        name="${regime}-${optimizer}-${constants}-${data}"
        python3 run.py sweep --workdir "experiments/results/x16/${name}" \
          --config "configs/sweeps_x16.py:regime=${regime},optimizer=${optimizer},constants=${constants},data=${data}" \
          >> "experiments/results/x16/${name}.log" 2>&1 || echo "${name} failed: see its log"
      done
    done
  done
done
