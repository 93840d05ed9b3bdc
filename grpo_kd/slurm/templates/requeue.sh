# SLURM sends USR2 {{signal_seconds}} s before the time limit; pass it on as {{forward}}. The phase checkpoints and
# exits {{requeue_code}} (or dies of it with nothing half-written); either way the job goes back to the queue and resumes.
trap 'kill -{{forward}} "$phase" 2>/dev/null; signalled=1' USR2
signalled=0
{{launch}} "$@" &
phase=$!
wait "$phase"; status=$?
while kill -0 "$phase" 2>/dev/null; do wait "$phase"; status=$?; done
if [ "$status" -eq {{requeue_code}} ] || { [ "$signalled" -eq 1 ] && [ "$status" -ne 0 ]; }; then
    echo "grpo-kd: job $SLURM_JOB_ID stopped on the pre-timeout signal (exit $status); requeueing it"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
fi
exit "$status"
