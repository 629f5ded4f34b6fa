#!/usr/bin/env bash
# Install what the Slurm tests need (Debian's slurmctld, slurmd, slurm-client and shellcheck), only
# when something is missing and we are root. Idempotent and quiet: prints nothing when all is there.
# Never fails the caller: without root or apt-get the Slurm tests skip and say why.
set -u

need=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client srun:slurm-client \
            scontrol:slurm-client shellcheck:shellcheck; do
    bin=${pair%%:*}
    pkg=${pair#*:}
    if ! command -v "$bin" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$bin" ]; then
        case " ${need[*]:-} " in *" $pkg "*) ;; *) need+=("$pkg") ;; esac
    fi
done
[ "${#need[@]}" -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "ensure_slurm: missing ${need[*]}; not root, so not installing (Slurm tests will skip)" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_slurm: missing ${need[*]}; no apt-get here (Slurm tests will skip)" >&2
    exit 0
fi

log=$(mktemp)
if DEBIAN_FRONTEND=noninteractive apt-get update -qq >"$log" 2>&1 &&
   DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >>"$log" 2>&1; then
    rm -f "$log"
else
    echo "ensure_slurm: apt-get install ${need[*]} failed; last lines of $log:" >&2
    tail -n 20 "$log" >&2
fi
exit 0
