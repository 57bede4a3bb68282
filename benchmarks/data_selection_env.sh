#!/usr/bin/env bash
# Separate venv with the PyPI `data-selection` package (p-lambda/dsir, MIT; the reference DSIR, a
# speed and agreement reference only, never a paperdag dependency). It needs no torch: its
# dependencies are numpy, datasets, tqdm, joblib and nltk (the `wordpunct` tokenizer needs no nltk
# data download). See peer_env.sh; idempotent: re-running reuses the venv.
#   bash benchmarks/data_selection_env.sh   -> benchmarks/_work/dsir-venv/bin/python
PEER_TORCH=0 exec bash "$(dirname "$0")/peer_env.sh" dsir "${DSIR_SPEC:-data-selection==1.0.3}" \
  "import importlib.metadata as m, numpy, nltk; from data_selection import HashedNgramDSIR; \
print('data-selection', m.version('data-selection'), 'numpy', numpy.__version__, 'nltk', nltk.__version__)"
