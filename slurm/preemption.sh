# Preemption. Slurm sends USR1 to this batch shell some seconds before the time limit
# (--signal=B:USR1) or on `scancel --batch --signal=USR1`. The trap forwards it to srun,
# which relays it to every process of the step. The launcher ignores USR1 (`trap "" USR1`
# before exec: accelerate does not forward USR1 and would die of it); the ranks'
# PreemptionWatcher sees it, they save a checkpoint at the next step boundary, write the
# marker file and exit @preempted_exit_code. The marker is needed because accelerate/torchrun
# report any failed rank as exit 1. A preempted step is requeued (Slurm starts it again
# about 2 minutes later) and the requeued run resumes from its checkpoint.
PREEMPTED_EXIT_CODE=@preempted_exit_code
export D2LORA_PREEMPT_MARKER=@marker_dir/"$SLURM_JOB_ID"
STEP_PID=
forward_usr1() {
  echo "[d2lora] USR1 at $(date -Is): asking the step to checkpoint and stop"
  [ -n "$STEP_PID" ] && kill -USR1 "$STEP_PID" 2>/dev/null
}
trap forward_usr1 USR1

wait_step() {  # REQUEUE_ID: wait for the background step $STEP_PID, then requeue or exit with its status
  local requeue_id=$1 rc
  wait "$STEP_PID"; rc=$?
  # wait returns early (status > 128) when the trap fires: wait again for the step itself
  while kill -0 "$STEP_PID" 2>/dev/null; do wait "$STEP_PID"; rc=$?; done
  STEP_PID=
  if [ "$rc" -eq "$PREEMPTED_EXIT_CODE" ] || [ -e "$D2LORA_PREEMPT_MARKER" ]; then
    rm -f "$D2LORA_PREEMPT_MARKER"
    echo "[d2lora] step preempted (exit $rc): scontrol requeue $requeue_id"
    if scontrol requeue "$requeue_id"; then
      echo "[d2lora] requeued $requeue_id: Slurm runs it again, from its checkpoint"
    else
      echo "[d2lora] requeue of $requeue_id failed: resubmit with \`d2lora sweep submit --only-failed\`"
    fi
    exit "$PREEMPTED_EXIT_CODE"
  fi
  echo "[d2lora] step exited $rc"
  exit "$rc"
}
rm -f "$D2LORA_PREEMPT_MARKER"  # a requeued run keeps its job id: drop the last run's marker
