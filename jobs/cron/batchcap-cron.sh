#!/usr/bin/env bash
# Keep a growing folder captioned: run from cron, captions only what is new or changed.
#
#   jobs/cron/batchcap-cron.sh WATCHED_DIR OUT [batchcap run options...]
#   e.g. */15 * * * *  /opt/batchcap/jobs/cron/batchcap-cron.sh /srv/photos /srv/captions/photos.parquet
#
# - `flock -n` on LOCK_FILE: when the previous run is still going, this one logs
#   "already running" and exits 0 without output (so cron sends no mail).
# - `batchcap run` is incremental by default: a rerun captions only new pictures and
#   pictures whose size or modification time changed; finished work is never redone.
# - Everything batchcap prints is appended to the log; on success this script prints
#   nothing. On trouble it prints what failed and the log's last lines to stderr and exits
#   non-zero, so cron mails it to you.
#
# Parameters (environment variables):
#   BATCHCAP   the batchcap command; default `batchcap` (cron's PATH is short: give a full path)
#   MODEL      model file passed as --model; empty: batchcap's default model
#   LOG_DIR    folder for the log; default: the folder of OUT. Log: LOG_DIR/<OUT name>.cron.log
#   LOCK_FILE  default: OUT.cron.lock
set -uo pipefail

if [ "$#" -lt 2 ]; then
    echo "usage: $(basename "$0") WATCHED_DIR OUT [batchcap run options...]" >&2
    exit 2
fi
WATCHED="$1"
OUT="$2"
shift 2
BATCHCAP="${BATCHCAP:-batchcap}"
LOG_DIR="${LOG_DIR:-$(dirname -- "$OUT")}"
LOG="$LOG_DIR/$(basename -- "$OUT").cron.log"
LOCK_FILE="${LOCK_FILE:-$OUT.cron.lock}"

stamp() { date -u +%Y-%m-%dT%H:%M:%SZ; }
log() { printf '%s batchcap-cron[%d]: %s\n' "$(stamp)" "$$" "$*" >>"$LOG"; }
fail() { # fail RC MESSAGE: report on stderr (cron mails it) and in the log
    log "error: $2"
    {
        echo "batchcap-cron: $2"
        echo "--- last lines of $LOG ---"
        tail -n 20 "$LOG" 2>/dev/null
    } >&2
    exit "$1"
}

if ! mkdir -p "$LOG_DIR" || ! touch "$LOG" 2>/dev/null; then
    echo "batchcap-cron: cannot write the log $LOG" >&2
    exit 1
fi
[ -d "$WATCHED" ] || fail 2 "watched folder $WATCHED does not exist"
command -v "$BATCHCAP" >/dev/null 2>&1 || fail 127 "batchcap command '$BATCHCAP' not found (set BATCHCAP to its full path)"

exec 9>>"$LOCK_FILE" || fail 1 "cannot open the lock file $LOCK_FILE"
if ! flock -n 9; then
    log "already running (lock $LOCK_FILE is held); nothing to do"
    exit 0
fi

cmd=("$BATCHCAP" run "$WATCHED" --out "$OUT")
if [ -n "${MODEL:-}" ]; then cmd+=(--model "$MODEL"); fi
cmd+=("$@")
log "start: ${cmd[*]}"
started=$(date +%s)
"${cmd[@]}" >>"$LOG" 2>&1  # inherits fd 9: the lock lasts as long as batchcap runs
rc=$?
elapsed=$(( $(date +%s) - started ))
if [ "$rc" -ne 0 ]; then
    fail "$rc" "batchcap run failed with exit code $rc after ${elapsed}s: ${cmd[*]}"
fi
log "done: rc=0 elapsed_s=$elapsed out=$OUT"
