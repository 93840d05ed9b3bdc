#!/bin/bash
# Start-up cost of a phase process, two trees side by side (before/after a change), interleaved in one sitting
# so that the machine's load falls on both alike; prints wall, user and sys seconds per run.
#
#   git archive 676f0de | tar -x -C /tmp/before      # the tree to compare with
#   ln -s "$PWD/runs" /tmp/before/runs                # both trees see the same finished run
#   RUNS=6 bash benchmarks/startup.sh /tmp/before "$PWD" runs/NAME/config.yaml
#
# CONFIG is the config of a run whose iteration 1 is finished (a config both trees accept), so the phase commands
# do nothing but start up. Each side runs from its own tree: `python -c` and `-m` put the working directory first
# on sys.path, ahead of an editable install.
set -u
BEFORE=${1:?before tree}; AFTER=${2:?after tree}; CONFIG=${3:?config of a finished run}; RUNS=${RUNS:-5}
export OMP_NUM_THREADS=1
echo "load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
for i in $(seq "$RUNS"); do
  for side in before after; do
    dir=$AFTER; [ "$side" = before ] && dir=$BEFORE
    cd "$dir" || exit 1
    t=$( { /usr/bin/time -f "%e %U %S" python -c "import grpo_kd.train.rollout, grpo_kd.train.update, grpo_kd.train.teacher_pass"; } 2>&1 | tail -1)
    echo "import3 $side $t"
    t=$( { /usr/bin/time -f "%e %U %S" python -m grpo_kd.cli.app update --config "$CONFIG" --iteration 1 >/dev/null; } 2>&1 | tail -1)
    echo "update-finished $side $t"
    t=$( { /usr/bin/time -f "%e %U %S" python -m grpo_kd.cli.app cache-teacher --config "$CONFIG" --iteration 1 >/dev/null; } 2>&1 | tail -1)
    echo "teacher-finished $side $t"
    z=$(python -X importtime -c "import grpo_kd.train.phases" 2>&1 | awk -F'|' '{n=$3; gsub(/ /,"",n)} n=="zarr" {printf "zarr %.3f ", $2/1e6} n=="grpo_kd.train.phases" {printf "phases %.3f", $2/1e6}')
    echo "importtime $side $z"
  done
done
echo "load at end: $(cut -d' ' -f1-3 /proc/loadavg)"
