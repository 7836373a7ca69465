# Sourced by demo.sh and test.sh: nothing phones home (Ray usage stats, library update
# checks, model hubs); Ray stays on loopback.
export RAY_USAGE_STATS_ENABLED=0 NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export RAY_ADDRESS="${RAY_ADDRESS:-}"
