#!/bin/bash
# One task of a `periln-ladder submit` job array: one run of the grid through common.sh (the same
# container, requeue and exit-status handling as the templates). periln-ladder submits it with
# LADDER_TASKS=<file>: line N+1 is array task N's "name<TAB>recipe<TAB>run dir<TAB>overrides".
# Its #SBATCH lines are the templates' defaults; periln-ladder passes the grid's -N and everything
# after `--` on its command line as sbatch options, which override them.
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

: "${LADDER_TASKS:?periln-ladder sets LADDER_TASKS}"
: "${SLURM_ARRAY_TASK_ID:?submit as a job array (periln-ladder submit)}"
IFS=$'\t' read -r LADDER_RUN RECIPE CKPT_DIR EXTRA_SETS < <(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$LADDER_TASKS")
[ -n "${CKPT_DIR:-}" ] || { echo "periln-slurm: ERROR: no task $SLURM_ARRAY_TASK_ID in $LADDER_TASKS" >&2; exit 2; }
export RECIPE CKPT_DIR EXTRA_SETS
mkdir -p "$CKPT_DIR"
rm -f "$CKPT_DIR/ladder-exit"
# The status periln-ladder status reads: every way out of periln_main is an `exit`.
trap 'printf "%s\n" "$?" >"$CKPT_DIR/ladder-exit"' EXIT
echo "[periln-slurm] ladder run $LADDER_RUN (array task $SLURM_ARRAY_TASK_ID, job ${SLURM_JOB_ID:-?})"
# shellcheck source=slurm/common.sh
source "${REPO:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh" ||
    { echo "periln-slurm: ERROR: slurm/common.sh not found; submit from the repo root or set REPO" >&2; exit 2; }
periln_main
