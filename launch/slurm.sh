#!/usr/bin/env bash
# Multi-node GPU with Slurm: one process per node, each seeing its node's GPUs; JAX finds
# its peers from the Slurm environment (jax.distributed.initialize()).
#
#   launch/slurm.sh --nodes 4 --gpus_per_node 8 --partition gpu --account A \
#       -- emgeo plan --model Llama-3.1-70B --mesh fsdp=32
#   launch/slurm.sh --nodes 2 --gpus_per_node 8 --partition gpu \
#       -- emgeo sweep md=runs/md.safetensors --model checkpoints/qwen7b --mesh fsdp=16 ...
#
# The batch script exports EMGEO_DISTRIBUTED=1 (the same as `emgeo ... --distributed`).
#
# Writes the batch script to --logs, prints it and the sbatch command; --dry_run submits nothing.
set -euo pipefail

NODES=1 GPUS=8 PARTITION="" ACCOUNT="" TIME="04:00:00" VENV="" LOGS="logs" DRY_RUN=0
CMD=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) NODES="$2"; shift 2 ;;
    --gpus_per_node) GPUS="$2"; shift 2 ;;
    --partition) PARTITION="$2"; shift 2 ;;
    --account) ACCOUNT="$2"; shift 2 ;;
    --time) TIME="$2"; shift 2 ;;
    --venv) VENV="$2"; shift 2 ;;
    --logs) LOGS="$2"; shift 2 ;;
    --dry_run) DRY_RUN=1; shift ;;
    --) shift; CMD=("$@"); break ;;
    *) echo "unknown flag $1" >&2; exit 2 ;;
  esac
done
[[ ${#CMD[@]} -eq 0 ]] && { echo "give the emgeo command after --" >&2; exit 2; }

mkdir -p "$LOGS"
SCRIPT="$LOGS/emgeo-$(date +%Y%m%d-%H%M%S).sbatch"
{
  echo "#!/usr/bin/env bash"
  echo "#SBATCH --job-name=emgeo"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --ntasks-per-node=1"
  echo "#SBATCH --gpus-per-node=$GPUS"
  echo "#SBATCH --output=$LOGS/%x-%j-%t.log"
  echo "#SBATCH --time=$TIME"
  [[ -n "$PARTITION" ]] && echo "#SBATCH --partition=$PARTITION"
  [[ -n "$ACCOUNT" ]] && echo "#SBATCH --account=$ACCOUNT"
  echo "set -euo pipefail"
  [[ -n "$VENV" ]] && echo "source $(printf '%q' "$VENV")/bin/activate"
  echo "export EMGEO_DISTRIBUTED=1"
  printf 'srun --output=%q' "$LOGS/%x-%j-node%n.log"
  printf ' %q' "${CMD[@]}"
  printf '\n'
} >"$SCRIPT"
echo "# $SCRIPT"
cat "$SCRIPT"
printf '+ sbatch %q\n' "$SCRIPT"
[[ "$DRY_RUN" == 1 ]] || sbatch "$SCRIPT"
