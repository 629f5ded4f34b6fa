# Training image for periln-megatron on H100 clusters (docker/podman build, then enroot/pyxis).
#
#   docker build -t periln-megatron:0.1.0 .
#   enroot import -o periln-megatron.sqsh dockerd://periln-megatron:0.1.0
#   CONTAINER_IMAGE=$PWD/periln-megatron.sqsh sbatch slurm/peri_3b.sbatch
#
# Base image: NGC PyTorch 25.11 (Ubuntu 24.04, Python 3.12, CUDA 13.0, PyTorch 2.10.0a0,
# Transformer Engine 2.9, apex, NCCL with IB/SHARP support).
# Why this tag:
#   * megatron-core 0.16.1's METADATA asks for Python >=3.10 and torch >=2.6.0; its `dev` extra
#     (what NVIDIA tests it with) pins transformer-engine >=2.9.0a0,<2.12.0. 25.11 is the
#     NGC release whose TE (2.9) first enters that range, with torch 2.10 and Python 3.12.
#   * These versions come from NVIDIA's release notes and published environment reports, as recalled
#     and cross-checked when this file was written; no Docker engine was available to pull
#     and inspect the image, so the build itself prints the versions (see the last RUN).
#   * CUDA 13.0 needs driver >= 580, or on data-center GPUs such as H100 an older LTS driver with the
#     CUDA forward-compatibility libraries the NGC image ships (see the NGC release notes).
# The tag is pinned; for bit-for-bit rebuilds also pin the digest (FROM ...@sha256:...).
FROM nvcr.io/nvidia/pytorch:25.11-py3

# NGC images carry /etc/pip/constraint.txt (exported as PIP_CONSTRAINT) that pins every Python
# package the image was built with, so nothing below can silently swap torch, TE or apex. The
# installs are additionally checked: the torch/TE/apex/triton lines of `pip list` must be
# identical before and after.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

WORKDIR /opt/periln-megatron

# Third-party dependencies first (cached across source edits).
# * megatron-core pinned and --no-deps: its hard requirements (torch, numpy, packaging) are the
#   image's own, and its optional extras (TE, apex, ...) are preinstalled there as well.
# * The rest of pyproject.toml's runtime dependencies: pinned exact where NGC does not ship the
#   package; range-only where the image already has it (pyyaml, numpy, psutil, matplotlib), so the
#   image's version (constraint-pinned) is kept and pip does nothing.
# * wandb (logging.wandb_project) and nltk (preprocess_data.py --split-sentences) are optional at run
#   time but used on clusters, so the image has them. lm-eval (tools/evaluate.py) is not: its
#   dependency tree (datasets, accelerate, evaluate, ...) would fight the image's constraints; run the
#   evaluation where `pip install "lm-eval[hf]"` is allowed to resolve, on an exported HF directory.
RUN pip list --format=freeze | grep -iE '^(torch|transformer[-_]engine[^=]*|apex|triton|pytorch[-_]triton)==' \
        > /tmp/pinned-before.txt \
 && pip install --no-deps megatron-core==0.16.1 \
 && pip install \
        transformers==5.23.0 \
        safetensors==0.8.0 \
        sentencepiece==0.2.3 \
        tiktoken==0.14.0 \
        wandb==0.31.0 \
        nltk==3.10.4 \
        "pyyaml>=6" \
        "numpy>=1.26" \
        "psutil>=5.9" \
        "matplotlib>=3.8" \
 && pip list --format=freeze | grep -iE '^(torch|transformer[-_]engine[^=]*|apex|triton|pytorch[-_]triton)==' \
        > /tmp/pinned-after.txt \
 && diff -u /tmp/pinned-before.txt /tmp/pinned-after.txt

# This package, without dependencies (all present above), non-editable into site-packages.
# The build then imports the library behind every tokenizer type a recipe can name (SentencePiece,
# Hugging Face, tiktoken), so a recipe cannot fail at its first step for a missing tokenizer library.
COPY pyproject.toml README.md ./
COPY periln_megatron ./periln_megatron
RUN pip install --no-deps --no-build-isolation . \
 && python -c "import sys, torch, megatron.core, periln_megatron; print('python', sys.version.split()[0], '| torch', torch.__version__, '| megatron-core', megatron.core.__version__)" \
 && pip list --format=freeze | grep -iE '^(transformer[-_]engine[^=]*|apex)==' \
 && periln-train --help > /dev/null \
 && python -c "from periln_megatron.data.tokenizers import check_tokenizer_libraries as check; print(check())"

# Recipes, Slurm templates and tools travel with the image; at run time the sbatch templates also
# mount the checkout (same path) and start from it, so recipes can be edited without a rebuild.
COPY recipes ./recipes
COPY slurm ./slurm
COPY tools ./tools
