#!/usr/bin/env bash
# Separate venv with galore-torch (Apache-2.0; the GaLore authors' optimizer, a parity and speed
# reference only, never a paperdag dependency: its __init__ imports bitsandbytes).
#   bash benchmarks/galore_env.sh   -> benchmarks/_work/galore-venv/bin/python
exec bash "$(dirname "$0")/peer_env.sh" galore "${GALORE_SPEC:-galore-torch==1.0}" \
  "import torch, galore_torch, importlib.metadata as m; \
print('torch', torch.__version__, 'galore-torch', m.version('galore-torch'), 'bitsandbytes', m.version('bitsandbytes'))"
