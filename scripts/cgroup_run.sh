#!/usr/bin/env bash
# Run a command under a hard memory limit and report what it used.
#
#   cgroup_run.sh [--evict FILE]... [--report FILE] [--read-mibps N] LIMIT -- CMD [ARGS...]
#
# LIMIT: bytes, or with a suffix K/M/G (binary: 1400M = 1400 MiB).
# Why a cgroup and not ulimit: the point of mfx is running models larger than
# RAM through the page cache, and page cache (file pages a process maps or reads)
# counts against a memory cgroup's limit but not against RLIMIT_AS/RSS. This is
# the "machine with only N bytes of RAM" experiment.
#
# --evict FILE: drop FILE's clean pages from the page cache first
#   (posix_fadvise DONTNEED), so the run starts cold. Needed for fairness: a page
#   already cached by another cgroup stays charged there, so a warm file would
#   let the limited command read it for free. Repeatable.
# --report FILE: also write the summary as JSON (peak bytes, major faults of the
#   command and of the whole cgroup, failcnt, time -v fields) for bench scripts.
#   Note: v1 memory.failcnt stays 0 when the kernel reclaims page cache at the
#   limit instead of failing a charge; major faults show the thrashing.
#   fs_input_bytes is the command's "File system inputs" (getrusage ru_inblock,
#   512-byte units on Linux): bytes the kernel really fetched from storage for
#   it, through page faults on an mmap, buffered reads and O_DIRECT alike, so
#   it compares an mmap runtime and a direct-I/O one on the same footing.
# --read-mibps N: also cap the command's reads from the block device that holds
#   the first --evict FILE (else the current directory) at N MiB/s (cgroup v1
#   blkio.throttle.read_bps_device; counts O_DIRECT reads and page-cache misses
#   alike). Why: an expert cache under a memory limit is bound by the disk, and
#   a VM's disk speed moves with its host's cache (540-1700 MiB/s on the same
#   machine on different days), so a fixed cap is the only way to compare runs
#   and to show how the speed depends on the disk.
#
# Works with cgroup v1 (memory.limit_in_bytes / memory.max_usage_in_bytes) and v2
# (memory.max / memory.peak). Needs root. Exit status is the command's; an OOM
# kill is reported on stderr and in the JSON.
set -euo pipefail

die() { echo "cgroup_run.sh: $*" >&2; exit 2; }

EVICT=()
REPORT=""
READ_MIBPS=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --evict) EVICT+=("$2"); shift 2 ;;
        --report) REPORT="$2"; shift 2 ;;
        --read-mibps) READ_MIBPS="$2"; shift 2 ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) break ;;
    esac
done
[[ $# -ge 3 && "$2" == "--" ]] || die "usage: cgroup_run.sh [--evict FILE]... [--report FILE] LIMIT -- CMD [ARGS...]"
LIMIT_ARG="$1"; shift 2

to_bytes() {
    local v="$1" n unit
    [[ "$v" =~ ^([0-9]+)([KkMmGg]?)(i?[Bb])?$ ]] || die "LIMIT '$v': expected bytes or a number with K/M/G"
    n="${BASH_REMATCH[1]}"; unit="${BASH_REMATCH[2]}"
    case "$unit" in
        K|k) echo $((n * 1024)) ;;
        M|m) echo $((n * 1024 * 1024)) ;;
        G|g) echo $((n * 1024 * 1024 * 1024)) ;;
        *) echo "$n" ;;
    esac
}
LIMIT="$(to_bytes "$LIMIT_ARG")"
[[ "$LIMIT" -ge $((16 * 1024 * 1024)) ]] || die "LIMIT $LIMIT bytes is below 16 MiB; probably a unit mistake"
[[ "$(id -u)" == 0 ]] || die "needs root to create a cgroup"

# Pick the hierarchy that has the memory controller.
if V1="$(awk '$3 == "cgroup" && $4 ~ /(^|,)memory(,|$)/ {print $2; exit}' /proc/mounts)" && [[ -n "$V1" ]]; then
    MODE=v1; ROOT="$V1"
elif V2="$(awk '$3 == "cgroup2" {print $2; exit}' /proc/mounts)" && [[ -n "$V2" ]] \
        && grep -qw memory "$V2/cgroup.controllers"; then
    MODE=v2; ROOT="$V2"
    grep -qw memory "$ROOT/cgroup.subtree_control" || echo +memory > "$ROOT/cgroup.subtree_control" \
        || die "$ROOT: cannot enable the memory controller for children"
else
    die "no cgroup hierarchy with the memory controller (see: mount | grep cgroup)"
fi

CG="$ROOT/mfx-run-$$"
mkdir "$CG" || die "cannot create $CG"
cleanup() {
    # Processes are gone by now; leftover page-cache charges move to the parent.
    rmdir "$CG" 2>/dev/null || true
}
trap cleanup EXIT

if [[ $MODE == v1 ]]; then
    echo "$LIMIT" > "$CG/memory.limit_in_bytes"
    # No swap on these machines, but make the limit hard if swap accounting exists.
    [[ -e "$CG/memory.memsw.limit_in_bytes" ]] && echo "$LIMIT" > "$CG/memory.memsw.limit_in_bytes" 2>/dev/null || true
else
    echo "$LIMIT" > "$CG/memory.max"
    [[ -e "$CG/memory.swap.max" ]] && echo 0 > "$CG/memory.swap.max" || true
fi

for f in "${EVICT[@]}"; do
    [[ -f "$f" ]] || die "--evict $f: not a file"
    python3 - "$f" <<'EOF'
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
try:
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
finally:
    os.close(fd)
EOF
done

# The read cap: a blkio cgroup (v1) beside the memory one.
BLKCG=""
if [[ -n "$READ_MIBPS" ]]; then
    [[ "$READ_MIBPS" =~ ^[0-9]+$ && "$READ_MIBPS" -gt 0 ]] || die "--read-mibps $READ_MIBPS: expected a positive whole number of MiB/s"
    BLKROOT="$(awk '$3 == "cgroup" && $4 ~ /(^|,)blkio(,|$)/ {print $2; exit}' /proc/mounts)"
    [[ -n "$BLKROOT" ]] || die "--read-mibps: no cgroup v1 blkio hierarchy mounted"
    ON="${EVICT[0]:-.}"
    DEVNO="$(stat -c '%Hd:%Ld' "$ON" 2>/dev/null)" || die "--read-mibps: cannot stat $ON"
    # Throttle rules apply to whole disks: a partition's rule goes to its disk.
    if [[ -e "/sys/dev/block/$DEVNO/partition" ]]; then
        DEVNO="$(cat "$(readlink -f "/sys/dev/block/$DEVNO/..")/dev")"
    fi
    [[ -e "/sys/dev/block/$DEVNO" ]] || die "--read-mibps: $ON is not on a block device ($DEVNO): nothing to throttle"
    BLKCG="$BLKROOT/mfx-run-$$"
    mkdir "$BLKCG" || die "cannot create $BLKCG"
    echo "$DEVNO $((READ_MIBPS * 1048576))" > "$BLKCG/blkio.throttle.read_bps_device" \
        || die "--read-mibps: the kernel refused a read cap on device $DEVNO"
    trap 'rmdir "$CG" 2>/dev/null || true; rmdir "$BLKCG" 2>/dev/null || true' EXIT
    echo "[cgroup_run] reads from device $DEVNO capped at $READ_MIBPS MiB/s" >&2
fi

TIMEF="$(mktemp)"
set +e
# The child joins the cgroup(s) before exec, so every page it touches is charged
# and every read it issues is throttled.
/bin/sh -c 'echo $$ > "$1/cgroup.procs" && { [ -z "$2" ] || echo $$ > "$2/cgroup.procs"; } && shift 2 && exec /usr/bin/time -v -o "$0" "$@"' \
    "$TIMEF" "$CG" "$BLKCG" "$@"
RC=$?
set -e

if [[ $MODE == v1 ]]; then
    PEAK="$(cat "$CG/memory.max_usage_in_bytes")"
    FAILCNT="$(cat "$CG/memory.failcnt")"
    CGMAJ="$(awk '$1 == "total_pgmajfault" {print $2}' "$CG/memory.stat")"
    OOMK="$(awk '$1 == "oom_kill" {print $2}' "$CG/memory.oom_control")"
else
    PEAK="$(cat "$CG/memory.peak" 2>/dev/null || echo -1)"
    FAILCNT="$(awk '$1 == "max" {print $2}' "$CG/memory.events")"
    CGMAJ="$(awk '$1 == "pgmajfault" {print $2}' "$CG/memory.stat")"
    OOMK="$(awk '$1 == "oom_kill" {print $2}' "$CG/memory.events")"
fi
RSS_KB="$(awk -F': ' '/Maximum resident set size/ {print $2}' "$TIMEF")"
MAJ="$(awk -F': ' '/Major \(requiring I\/O\) page faults/ {print $2}' "$TIMEF")"
FSIN="$(awk -F': ' '/File system inputs/ {print $2}' "$TIMEF")"
WALL="$(awk -F': ' '/Elapsed \(wall clock\) time/ {print $2}' "$TIMEF")"
rm -f "$TIMEF"

mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
{
    echo "[cgroup_run] $MODE limit $(mib "$LIMIT") MiB | cgroup peak $(mib "$PEAK") MiB (incl. page cache)" \
         "| own peak RSS $(mib $((${RSS_KB:-0} * 1024))) MiB | major faults ${MAJ:-?} (cgroup ${CGMAJ:-?})" \
         "| failcnt ${FAILCNT:-?} | read $(mib $((${FSIN:-0} * 512))) MiB" \
         "| oom kills ${OOMK:-0} | wall ${WALL:-?} | exit $RC"
} >&2
[[ "${OOMK:-0}" == 0 ]] || echo "[cgroup_run] the command was OOM-killed at the $(mib "$LIMIT") MiB limit" >&2

if [[ -n "$REPORT" ]]; then
    cat > "$REPORT" <<EOF
{"cgroup": "$MODE", "limit_bytes": $LIMIT, "cgroup_peak_bytes": $PEAK, "peak_rss_bytes": $((${RSS_KB:-0} * 1024)),
 "major_faults": ${MAJ:-null}, "fs_input_bytes": $((${FSIN:-0} * 512)), "cgroup_major_faults": ${CGMAJ:-null}, "failcnt": ${FAILCNT:-null}, "oom_kills": ${OOMK:-0}, "wall": "${WALL:-}", "exit": $RC}
EOF
fi
exit "$RC"
