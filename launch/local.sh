#!/usr/bin/env bash
# N processes on this machine, each with its own simulated CPU devices, joined by
# jax.distributed (gloo): the multi-host code path without a cluster.
#
#   launch/local.sh --num_processes 2 --devices_per_process 2 -- emgeo plan --model ...
#   launch/local.sh --num_processes 2 --devices_per_process 4 \
#       -- emgeo extract --model default --data pairs.jsonl --out runs/act
#   launch/local.sh --num_processes 2 -- python my_script.py   # script calls
#                                       # emgeo_jax.parallel.initialize_distributed()
#
# Each process gets EMGEO_DISTRIBUTED=1 and EMGEO_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID,
# which `emgeo` reads as `--distributed --coordinator_address ... --num_processes ...
# --process_id ...`.
#
# Logs go to --logs/process-I.log; exits non-zero if any process fails.
set -euo pipefail

NUM=2 DEVICES=1 PORT=12355 LOGS="logs/local" DRY_RUN=0
CMD=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --num_processes) NUM="$2"; shift 2 ;;
    --devices_per_process) DEVICES="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --logs) LOGS="$2"; shift 2 ;;
    --dry_run) DRY_RUN=1; shift ;;
    --) shift; CMD=("$@"); break ;;
    *) echo "unknown flag $1" >&2; exit 2 ;;
  esac
done
[[ ${#CMD[@]} -eq 0 ]] && { echo "give the command after --" >&2; exit 2; }

mkdir -p "$LOGS"
PIDS=()
for ((i = 0; i < NUM; i++)); do
  ENV=(env JAX_PLATFORMS=cpu "JAX_NUM_CPU_DEVICES=$DEVICES" EMGEO_DISTRIBUTED=1
    "EMGEO_COORDINATOR=127.0.0.1:$PORT" "EMGEO_NUM_PROCESSES=$NUM" "EMGEO_PROCESS_ID=$i")
  printf '+'
  printf ' %q' "${ENV[@]}" "${CMD[@]}"
  printf ' > %q 2>&1 &\n' "$LOGS/process-$i.log"
  if [[ "$DRY_RUN" == 0 ]]; then
    "${ENV[@]}" "${CMD[@]}" >"$LOGS/process-$i.log" 2>&1 &
    PIDS+=("$!")
  fi
done
STATUS=0
for ((i = 0; i < ${#PIDS[@]}; i++)); do
  if ! wait "${PIDS[$i]}"; then
    echo "process $i failed; see $LOGS/process-$i.log" >&2
    STATUS=1
  fi
done
exit "$STATUS"
