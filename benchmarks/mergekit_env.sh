#!/usr/bin/env bash
# Separate venv with mergekit (LGPL-3.0, optional parity reference only; never a paperdag dependency);
# see peer_env.sh for how torch stays the CPU build.
#   bash benchmarks/mergekit_env.sh        -> benchmarks/_work/mergekit-venv/bin/mergekit-yaml
exec bash "$(dirname "$0")/peer_env.sh" mergekit mergekit \
  "import torch, mergekit, transformers, importlib.metadata as m; \
print('torch', torch.__version__, 'mergekit', m.version('mergekit'), 'transformers', transformers.__version__)"
