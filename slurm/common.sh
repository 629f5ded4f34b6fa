# shellcheck shell=bash
# Shared body of every slurm/*.sbatch template. A template sets its #SBATCH lines and a default
# RECIPE, then sources this file and calls `periln_main`. Nothing here needs editing for a run:
# every knob is an environment variable, read at submit time (sbatch exports the caller's
# environment to the job by default). See slurm/README.md.
#
# User overrides (environment):
#   RECIPE           recipe YAML, relative to the repo or absolute (template default)
#   DATA_PREFIXES    Megatron data prefixes, whitespace- or comma-separated, optional weights:
#                    "/d/a_text_document /d/b_text_document" or "0.3 /d/a 0.7 /d/b".
#                    Empty: the recipe's own data section is used.
#   CKPT_DIR         checkpoint directory on shared storage; resume is automatic from it
#                    (default: $REPO/runs/<job name>/checkpoints)
#   TRAIN_STEPS      total training steps (train.steps=N)
#   EXTRA_SETS       extra recipe overrides, whitespace-separated key=value, each passed as --set
#   EXTRA_ARGS       extra trainer arguments, e.g. "--exit-after-minutes 230"
#   CONTAINER_IMAGE  run in this container through pyxis/enroot (image URI or .sqsh path)
#   CONTAINER_MOUNTS extra pyxis mounts, comma-separated src:dst[:flags]
#   VENV             venv or conda prefix to run from (default: $REPO/.venv if it exists,
#                    otherwise whatever is on PATH)
#   PERILN_TRAIN     trainer command (default: periln-train)
#   SRUN_ARGS        extra srun arguments
#   PERILN_CPU_BIND  srun --cpu-bind value (default cores; none, or e.g. map_ldom:0,0,0,0,1,1,1,1)
#   MAX_REQUEUES     stop requeueing after this many restarts (default 100)
#   PERILN_SOCKET_IFNAME  network interface between the nodes, the default of GLOO_SOCKET_IFNAME
#                    and NCCL_SOCKET_IFNAME (default: unset, the libraries choose)
#   REPO             repository root (default: the directory sbatch was run from)
# Node count, account, partition and time limit are sbatch options, not variables:
#   sbatch -A myacct -p gpu -N 8 -t 12:00:00 slurm/peri_3b.sbatch

# Exit status contract with the trainer (periln_megatron/training/loop.py).
readonly PERILN_EXIT_DONE=0
readonly PERILN_EXIT_REQUEUE=75   # EX_TEMPFAIL: checkpoint saved after a signal, requeue me

periln_log() { printf '[periln-slurm %(%F %T)T] %s\n' -1 "$*"; }
periln_die() {
    printf '[periln-slurm %(%F %T)T] ERROR: %s\n' -1 "$*" >&2
    exit 2
}

# ---------------------------------------------------------------------------- environment
# Every default below is overridable from the submitting shell.
periln_env() {
    # Megatron-core requires 1 when tensor/sequence parallel communication overlaps compute: the
    # GPU then executes kernels in launch order, so the comm kernel is scheduled before the GEMM.
    : "${CUDA_DEVICE_MAX_CONNECTIONS:=1}"
    # Let the NCCL process group free tensors of async collectives at wait() instead of holding
    # them via recordStream: lower, more predictable memory with overlapped grad reduce/param gather.
    : "${TORCH_NCCL_AVOID_RECORD_STREAMS:=1}"
    # Surface NCCL errors/timeouts as exceptions that tear the job down instead of hanging it.
    : "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}"
    # NCCL logging level: WARN keeps job logs readable; INFO to debug topology/IB problems.
    : "${NCCL_DEBUG:=WARN}"
    # InfiniBand verbs timeout exponent (4.096us * 2^N). 22 (~17 s) rides out transient fabric
    # congestion on large jobs instead of failing the collective.
    : "${NCCL_IB_TIMEOUT:=22}"
    # IB retry count before an error is reported (NCCL's maximum).
    : "${NCCL_IB_RETRY_CNT:=7}"
    # Use GPUDirect RDMA between the NIC and GPU memory when they share a PCIe switch (H100 HGX).
    : "${NCCL_NET_GDR_LEVEL:=PHB}"
    # Optional, cluster specific, exported only when set: the IB HCAs NCCL may use
    # (e.g. "mlx5_0,mlx5_1,...") and the IB service level / traffic class of the fabric's QoS setup.
    : "${NCCL_IB_HCA:=}" "${NCCL_IB_SL:=}" "${NCCL_IB_TC:=}"
    # The network interface that ranks on different nodes reach each other through, for the socket
    # traffic of torch.distributed: gloo's connections (CPU runs, and the gloo groups megatron-core
    # creates beside NCCL's) and NCCL's bootstrap. PERILN_SOCKET_IFNAME names it for both, as exact
    # interface names present on every node ("eth0", "ib0"); GLOO_SOCKET_IFNAME or NCCL_SOCKET_IFNAME
    # override one (NCCL's also takes "^docker,lo" or a prefix). Unset, gloo uses the address the
    # node's hostname resolves to and NCCL picks an interface itself: set it where hostnames resolve
    # to a loopback address (127.0.1.1 in Debian's /etc/hosts) or to a network between the nodes
    # that should not carry the traffic. Exported only when set.
    : "${PERILN_SOCKET_IFNAME:=}"
    : "${GLOO_SOCKET_IFNAME:=$PERILN_SOCKET_IFNAME}" "${NCCL_SOCKET_IFNAME:=$PERILN_SOCKET_IFNAME}"
    # CPU threads per rank for intra-op parallelism (data loading, CPU ops); 8 ranks share a node.
    : "${OMP_NUM_THREADS:=${SLURM_CPUS_PER_TASK:-4}}"
    # Print log lines as they happen, not when a buffer fills, so the job log follows training.
    : "${PYTHONUNBUFFERED:=1}"
    # Rendezvous host: the job's first node, where rank 0 runs (the batch shell too). Always this
    # job's: sbatch exports the submitting shell's environment, and a MASTER_ADDR there (from an
    # earlier job or a torchrun session) names other nodes. The port defaults (in the trainer) to
    # 20000 + job id % 20000, so jobs sharing a node do not collide; set MASTER_PORT to pin it.
    local first var stale=""
    first=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null | head -n 1)
    : "${first:=${SLURMD_NODENAME:-}}"
    if [ -n "$first" ]; then
        [ -n "${MASTER_ADDR:-}" ] && [ "$MASTER_ADDR" != "$first" ] && stale+=" MASTER_ADDR=$MASTER_ADDR"
        MASTER_ADDR=$first
    fi
    : "${MASTER_ADDR:=127.0.0.1}"
    # The trainer takes torchrun's RANK/WORLD_SIZE/LOCAL_RANK before Slurm's: left over from the
    # submitting shell, they would make every srun task a world of one.
    for var in RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK; do
        [ -n "${!var+set}" ] && stale+=" $var=${!var}" && unset "$var"
    done
    [ -z "$stale" ] || periln_log "ignoring the submitting shell's${stale}: srun sets the ranks, the rendezvous is this job's first node"
    export CUDA_DEVICE_MAX_CONNECTIONS TORCH_NCCL_AVOID_RECORD_STREAMS TORCH_NCCL_ASYNC_ERROR_HANDLING \
        NCCL_DEBUG NCCL_IB_TIMEOUT NCCL_IB_RETRY_CNT NCCL_NET_GDR_LEVEL OMP_NUM_THREADS \
        PYTHONUNBUFFERED MASTER_ADDR
    for var in NCCL_IB_HCA NCCL_SOCKET_IFNAME NCCL_IB_SL NCCL_IB_TC GLOO_SOCKET_IFNAME; do
        if [ -n "${!var}" ]; then export "${var?}"; else unset "$var"; fi
    done
}

# ---------------------------------------------------------------------------- checks
# Fill PERILN_CMD (the trainer command line) and PERILN_MOUNTS, failing fast on bad input.
periln_prepare() {
    : "${REPO:=${SLURM_SUBMIT_DIR:-$PWD}}"
    [ -f "$REPO/slurm/common.sh" ] || periln_die "REPO=$REPO is not the periln-megatron checkout; submit from the repo root or set REPO"
    cd "$REPO" || periln_die "cannot cd to REPO=$REPO"
    REPO=$PWD   # absolute: it is a container mount and the workdir on every node

    : "${RECIPE:?template must set RECIPE}"
    local recipe="$RECIPE"
    [ "${recipe#/}" = "$recipe" ] && recipe="$REPO/$recipe"
    [ -f "$recipe" ] || periln_die "recipe file not found: $RECIPE (looked at $recipe)"
    [ -r "$recipe" ] || periln_die "recipe file not readable: $recipe"

    : "${CKPT_DIR:=$REPO/runs/${SLURM_JOB_NAME:-periln}/checkpoints}"
    mkdir -p "$CKPT_DIR" 2>/dev/null || periln_die "cannot create checkpoint directory CKPT_DIR=$CKPT_DIR"
    [ -w "$CKPT_DIR" ] || periln_die "checkpoint directory not writable: CKPT_DIR=$CKPT_DIR"
    CKPT_DIR=$(cd "$CKPT_DIR" && pwd)

    PERILN_MOUNTS=("$REPO" "$CKPT_DIR")
    local item
    local -a sets=("checkpoint.dir=$CKPT_DIR")
    if [ -n "${DATA_PREFIXES:-}" ]; then
        local -a items
        local flow="" missing="" n_paths=0
        read -r -a items <<<"${DATA_PREFIXES//,/ }"
        for item in "${items[@]}"; do
            if [[ $item =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]]; then
                flow+="${flow:+,}$item"       # a blend weight
                continue
            fi
            case $item in *.bin | *.idx) item="${item%.*}" ;; esac  # a prefix given as its file, as data.prefixes
            [ "${item#/}" = "$item" ] && item="$REPO/$item"
            [ -f "$item.bin" ] || missing+=" $item.bin"
            [ -f "$item.idx" ] || missing+=" $item.idx"
            flow+="${flow:+,}$item"
            PERILN_MOUNTS+=("$(dirname "$item")")
            n_paths=$((n_paths + 1))
        done
        [ -z "$missing" ] || periln_die "data prefix files not found:$missing (DATA_PREFIXES=$DATA_PREFIXES)"
        [ "$n_paths" -gt 0 ] || periln_die "DATA_PREFIXES has weights but no paths: $DATA_PREFIXES"
        # Real data replaces a recipe's synthetic tokens (tiny CPU recipes use those).
        sets+=("data.prefixes=[$flow]" "data.synthetic=false")
    fi
    if [ -n "${TRAIN_STEPS:-}" ]; then
        [[ $TRAIN_STEPS =~ ^[1-9][0-9]*$ ]] || periln_die "TRAIN_STEPS must be a positive integer, got: $TRAIN_STEPS"
        sets+=("train.steps=$TRAIN_STEPS")
    fi
    local -a extra_sets extra_args
    read -r -a extra_sets <<<"${EXTRA_SETS:-}"
    for item in "${extra_sets[@]}"; do
        [[ $item == ?*=* ]] || periln_die "EXTRA_SETS entries must be key=value, got: $item"
        sets+=("$item")
    done
    read -r -a extra_args <<<"${EXTRA_ARGS:-}"

    # One task per GPU: srun inherits the allocation's --ntasks-per-node. --kill-on-bad-exit=1: the
    # first rank that dies or exits non-zero ends the step (SIGTERM to the rest, SIGKILL KillWait
    # later) instead of leaving the others blocked in a collective until the process-group timeout.
    # Exit 75 must not count as bad (the others are still shutting down after the same save), so
    # each rank runs under PERILN_RANK_WRAPPER, which reports 75 to srun as 0 and records it.
    PERILN_SRUN=(srun --kill-on-bad-exit=1)
    # CPU binding: each rank gets its share of the node's cores (the templates' --cpus-per-task, or
    # sbatch -c N) and is bound to them, so the main thread, the batch prefetcher, NCCL's proxies and
    # async-checkpoint writers neither wander across NUMA nodes nor share one CPU. srun no longer
    # inherits -c from sbatch (Slurm >= 22.05): pass it on. PERILN_CPU_BIND takes any srun --cpu-bind
    # value: "none" for no binding, or a per-rank NUMA map such as map_ldom:0,0,0,0,1,1,1,1.
    : "${PERILN_CPU_BIND:=cores}"
    [ -n "${SLURM_CPUS_PER_TASK:-}" ] && PERILN_SRUN+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    PERILN_SRUN+=(--cpu-bind="$PERILN_CPU_BIND")
    local -a launcher
    if [ -n "${CONTAINER_IMAGE:-}" ]; then
        srun --help 2>&1 | grep -q -- '--container-image' ||
            periln_die "CONTAINER_IMAGE is set but this srun has no --container-image (pyxis plugin not installed)"
        local mounts="" m
        local -a unique
        mapfile -t unique < <(printf '%s\n' "${PERILN_MOUNTS[@]}" | sort -u)
        for m in "${unique[@]}"; do
            mounts+="${mounts:+,}$m:$m"
        done
        [ -n "${CONTAINER_MOUNTS:-}" ] && mounts+=",$CONTAINER_MOUNTS"
        PERILN_SRUN+=(--container-image="$CONTAINER_IMAGE" --container-mounts="$mounts"
                      --container-workdir="$REPO" --no-container-mount-home)
        read -r -a launcher <<<"${PERILN_TRAIN:-periln-train}"
    else
        if [ -z "${VENV:-}" ] && [ -d "$REPO/.venv" ]; then VENV="$REPO/.venv"; fi
        if [ -n "${VENV:-}" ]; then
            [ -d "$VENV/bin" ] || periln_die "VENV=$VENV has no bin/ directory"
            PATH="$VENV/bin:$PATH"
            export VIRTUAL_ENV="$VENV" PATH
        fi
        read -r -a launcher <<<"${PERILN_TRAIN:-periln-train}"
        if ! command -v "${launcher[0]}" >/dev/null 2>&1; then
            # A checkout whose package is not pip-installed (no console script) still runs from $REPO.
            if [ -z "${PERILN_TRAIN:-}" ] && python -c 'import periln_megatron' >/dev/null 2>&1; then
                launcher=(python -m periln_megatron.train)
                periln_log "periln-train is not installed in ${VENV:-PATH}; running python -m periln_megatron.train from $REPO"
            else
                periln_die "trainer '${launcher[0]}' not found (VENV=${VENV:-unset}); pip install -e . into a venv, set VENV, or set CONTAINER_IMAGE"
            fi
        fi
    fi
    [ -z "${CONTAINER_IMAGE:-}" ] && periln_preflight "$recipe" "${sets[@]}"
    local -a srun_args
    read -r -a srun_args <<<"${SRUN_ARGS:-}"
    PERILN_SRUN+=("${srun_args[@]}")

    PERILN_CMD=("${launcher[@]}" --recipe "$recipe")
    for item in "${sets[@]}"; do PERILN_CMD+=(--set "$item"); done
    PERILN_CMD+=("${extra_args[@]}")
}

# Outside containers the batch node has the package: validate the recipe with all overrides against
# the job's world size, and check its data prefixes (the recipe's own or DATA_PREFIXES/EXTRA_SETS),
# before srun starts anything. Exit 2 from the snippet: invalid; 3: cannot check.
periln_preflight() {
    local out rc
    out=$(python - "$@" <<'PY' 2>&1
import os, re, sys
try:
    from periln_megatron.config import load_recipe
except Exception as e:  # an old checkout or a broken env: the trainer will tell
    print(f"cannot import periln_megatron.config ({e})"); sys.exit(3)
recipe_path, sets = sys.argv[1], sys.argv[2:]
try:
    recipe = load_recipe(recipe_path, sets, world_size=int(os.environ.get("SLURM_NTASKS", "1")),
                         check_environment=False)
except Exception as e:
    print(e); sys.exit(2)
if not recipe.data.synthetic:
    missing = [p + ext for p in recipe.data.prefixes
               if not re.fullmatch(r"[0-9.eE+-]+", str(p)) for ext in (".bin", ".idx")
               if not os.path.isfile(str(p) + ext)]
    if missing:
        print("data prefix files not found: " + " ".join(missing) + " (data.prefixes of the recipe; set DATA_PREFIXES to override)")
        sys.exit(2)
PY
    )
    rc=$?
    case "$rc" in
        0) periln_log "recipe check passed (keys, values, layout for ${SLURM_NTASKS:-1} ranks, data files)" ;;
        2) periln_die "$out" ;;
        *) periln_log "recipe check skipped: ${out:-exit $rc}" ;;
    esac
}

# ---------------------------------------------------------------------------- rank exit status
# Every rank runs as `bash -c "$PERILN_RANK_WRAPPER" periln-rank TRAINER ARGS...`. It writes the
# trainer's exit status to $PERILN_EXIT_DIR/<rank> (shared storage: under CKPT_DIR) and turns 75 into
# 0, so that srun --kill-on-bad-exit does not cancel the step while the other ranks still exit from
# the same save. Slurm signals every process of a step: the trap keeps this shell waiting for the
# trainer, which acts on TERM/USR1 itself (a trapped signal waits for the foreground command).
# It first prints where the rank runs: the kernel's hostname, not $HOSTNAME, which srun copies from
# the batch shell's environment to every node.
# shellcheck disable=SC2016  # expanded by the rank's shell, not here
readonly PERILN_RANK_WRAPPER='trap : TERM USR1
printf "[periln-slurm %(%F %T)T] rank %s/%s (local %s) on %s, master %s\n" -1 "$SLURM_PROCID" "$SLURM_NTASKS" "$SLURM_LOCALID" "$(</proc/sys/kernel/hostname)" "$MASTER_ADDR"
"$@"
rc=$?
printf "%s\n" "$rc" >"$PERILN_EXIT_DIR/$SLURM_PROCID" || exit "$rc"
[ "$rc" -eq 75 ] && exit 0
exit "$rc"'

# Read the ranks' statuses, then remove them: PERILN_SAVED counts the ranks that exited 75 (saved
# and stopped); PERILN_RANK_FAILURE is the first status (by time written) that is neither 0 nor 75,
# empty if none: the rank that failed first, not one that failed because of it; PERILN_RANK_SUMMARY
# says which ranks exited how, for the log.
periln_collect_exits() {
    PERILN_SAVED=0
    PERILN_RANK_FAILURE=""
    PERILN_RANK_SUMMARY=""
    local rank code n _ seen=0
    local -a codes=()
    local -A ranks_of=() count_of=()
    while read -r _ rank; do
        [[ $rank =~ ^[0-9]+$ ]] || continue
        code=$(<"$PERILN_EXIT_DIR/$rank")
        [[ $code =~ ^[0-9]+$ ]] || continue
        seen=$((seen + 1))
        ranks_of[$code]+="${ranks_of[$code]:+,}$rank"
        count_of[$code]=$((${count_of[$code]:-0} + 1))
        if [ "$code" -eq "$PERILN_EXIT_REQUEUE" ]; then
            PERILN_SAVED=$((PERILN_SAVED + 1))
        elif [ "$code" -ne "$PERILN_EXIT_DONE" ] && [ -z "$PERILN_RANK_FAILURE" ]; then
            PERILN_RANK_FAILURE=$code
        fi
    done < <(find "$PERILN_EXIT_DIR" -maxdepth 1 -type f -printf '%T@ %f\n' 2>/dev/null | sort -k1,1n -k2,2n)
    mapfile -t codes < <(printf '%s\n' "${!ranks_of[@]}" | sort -n)
    for code in "${codes[@]}"; do
        [ -n "$code" ] || continue
        n=${count_of[$code]}
        if [ "$n" -le 8 ]; then n="rank ${ranks_of[$code]}"; else n="$n ranks"; fi
        PERILN_RANK_SUMMARY+="${PERILN_RANK_SUMMARY:+, }exit $code on $n"
    done
    n=$((${SLURM_NTASKS:-$seen} - seen))
    [ "$n" -gt 0 ] && PERILN_RANK_SUMMARY+="${PERILN_RANK_SUMMARY:+, }$n rank(s) without a status (stopped by Slurm, or never started)"
    : "${PERILN_RANK_SUMMARY:=no rank status}"
    rm -rf "$PERILN_EXIT_DIR"
    rmdir "${PERILN_EXIT_DIR%/*}" 2>/dev/null
    return 0
}

# ---------------------------------------------------------------------------- signals
# The batch shell alone receives `--signal=B:USR1@N` (and `scancel --signal=USR1 --batch`): pass it
# to the srun step, whose tasks save a checkpoint at the next step boundary and exit 75.
# SIGTERM (scancel, preemption) already reaches every task from Slurm itself; just remember it,
# so that a cancelled job is not requeued.
PERILN_SRUN_PID=""
PERILN_SIGNALLED=0
PERILN_GOT_TERM=0
periln_on_usr1() {
    PERILN_SIGNALLED=1
    periln_log "SIGUSR1 received (time limit near or preemption notice): asking ranks to save and stop"
    [ -n "$PERILN_SRUN_PID" ] && kill -s USR1 "$PERILN_SRUN_PID" 2>/dev/null
}
periln_on_term() {
    PERILN_SIGNALLED=1
    PERILN_GOT_TERM=1
    periln_log "SIGTERM received (scancel or preemption): ranks save and stop; this job will not requeue itself"
}

# ---------------------------------------------------------------------------- main
periln_main() {
    periln_prepare
    periln_env
    periln_log "job ${SLURM_JOB_ID:-?} (${SLURM_JOB_NAME:-?}) restart ${SLURM_RESTART_COUNT:-0}:" \
        "${SLURM_JOB_NUM_NODES:-?} node(s) [${SLURM_JOB_NODELIST:-?}], ${SLURM_NTASKS:-?} task(s), master $MASTER_ADDR"
    if [ -n "${MASTER_PORT:-}" ]; then
        periln_log "rendezvous port $MASTER_PORT: MASTER_PORT from the environment (sbatch exports the submitting shell's)"
    else
        periln_log "rendezvous port $((20000 + ${SLURM_JOB_ID:-0} % 20000)) (20000 + job id % 20000; set MASTER_PORT to pin it)"
    fi
    periln_log "recipe $RECIPE, checkpoints $CKPT_DIR${CONTAINER_IMAGE:+, container $CONTAINER_IMAGE}"
    if [ -n "${GLOO_SOCKET_IFNAME:-}${NCCL_SOCKET_IFNAME:-}" ]; then
        periln_log "socket interfaces: GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-unset} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-unset}"
    fi
    periln_log "launch: ${PERILN_SRUN[*]} ${PERILN_CMD[*]}"

    PERILN_EXIT_DIR="$CKPT_DIR/.periln-exit/${SLURM_JOB_ID:-$$}"
    rm -rf "$PERILN_EXIT_DIR"
    mkdir -p "$PERILN_EXIT_DIR" || periln_die "cannot create $PERILN_EXIT_DIR (the ranks' exit statuses)"
    export PERILN_EXIT_DIR

    trap periln_on_usr1 USR1
    trap periln_on_term TERM
    "${PERILN_SRUN[@]}" bash -c "$PERILN_RANK_WRAPPER" periln-rank "${PERILN_CMD[@]}" &
    PERILN_SRUN_PID=$!
    local rc
    while :; do
        PERILN_SIGNALLED=0
        wait "$PERILN_SRUN_PID"
        rc=$?
        # wait returns early (status > 128) when a trapped signal arrives; srun is still running.
        [ "$PERILN_SIGNALLED" -eq 1 ] && kill -0 "$PERILN_SRUN_PID" 2>/dev/null && continue
        [ "$PERILN_SIGNALLED" -eq 1 ] && [ "$rc" -gt 128 ] && { wait "$PERILN_SRUN_PID"; rc=$?; }
        break
    done
    trap - USR1 TERM

    periln_collect_exits
    # A rank exits 75 only after the save's closing barrier, which comes after rank 0 published the
    # checkpoint: one 75 means every rank saved. Ranks failing after that (a crash at exit, or killed
    # by srun for it) do not undo the checkpoint. srun's own status cannot tell: a step that srun
    # ended exits 128+SIGTERM or 128+SIGKILL, whatever the first rank's status was.
    if [ "$PERILN_SAVED" -gt 0 ] || [ "$rc" -eq "$PERILN_EXIT_REQUEUE" ]; then
        local marker="$CKPT_DIR/latest_checkpointed_iteration.txt" saved="checkpoint saved"
        [ -f "$marker" ] && saved+=" (iteration $(<"$marker"))"
        if [ "$PERILN_GOT_TERM" -eq 1 ]; then
            periln_log "$saved after SIGTERM; not requeueing (Slurm requeues preempted jobs itself)"
            exit 0
        fi
        [ "$rc" -eq 0 ] || periln_log "warning: srun exit status $rc ($PERILN_RANK_SUMMARY); the ranks saved before that"
        local restarts=${SLURM_RESTART_COUNT:-0}
        if [ "$restarts" -ge "${MAX_REQUEUES:-100}" ]; then
            periln_die "$saved, but restart $restarts reached MAX_REQUEUES=${MAX_REQUEUES:-100}; not requeueing"
        fi
        periln_log "$saved, ranks exited 75; requeueing job $SLURM_JOB_ID to resume from $CKPT_DIR"
        scontrol requeue "$SLURM_JOB_ID" || periln_die "scontrol requeue $SLURM_JOB_ID failed (does the cluster allow requeue? see #SBATCH --requeue)"
        exit 0
    fi
    if [ "$rc" -eq "$PERILN_EXIT_DONE" ]; then
        periln_log "training finished (exit 0)"
        exit 0
    fi
    # Exit with the failing rank's own status (1: an exception, 3: NaN, ...) where there is one, not
    # the 143/137 of the ranks srun stopped for it.
    periln_log "training failed: srun exit status $rc ($PERILN_RANK_SUMMARY); not requeueing"
    exit "${PERILN_RANK_FAILURE:-$rc}"
}
