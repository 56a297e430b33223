# Source on a GPU machine without network access: installs carried wheels (.whl/) into /tmp/site and
# makes qdylora / qdylora_kernels importable from this checkout without pip-installing it.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
mkdir -p /tmp/pkgs
ln -sfn "$PWD/qdylora" /tmp/pkgs/qdylora
ln -sfn "$PWD/kernels/qdylora_kernels" /tmp/pkgs/qdylora_kernels
export PYTHONPATH=/tmp/pkgs:/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi -L
python3 -c "import torch, triton, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__, torch.cuda.get_device_name(0))"
