"""Pure algorithms by stage: torch, numpy, pandas and HF only. Never Prefect, MLflow or DVC."""
