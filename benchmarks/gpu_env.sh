# Source on the GPU machine (no network) for commands by hand: installs the carried wheels (.whl/)
# into /tmp/qdylora_site and puts them and this checkout's packages first on PYTHONPATH, as
# scripts/gpu_check.sh does for its stages (benchmarks/gpu_wheels.py).
eval "$(python3 - <<'PY'
import shlex, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
import gpu_wheels as w
error = w.install(Path("/tmp/qdylora_site"))
if error:
    print(f"echo {shlex.quote('carried wheels not installed: ' + error)} >&2")
env = w.stage_env([Path("/tmp/qdylora_site"), w.packages_dir(Path("/tmp/qdylora_pkgs"))])
for k in ("PYTHONPATH", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "PYTHONUNBUFFERED", "TOKENIZERS_PARALLELISM",
          "TRITON_DEFAULT_FP_FUSION"):
    print(f"export {k}={shlex.quote(env[k])}")
PY
)"
nvidia-smi -L
python3 benchmarks/gpu_env_report.py --output /tmp/qdylora_env.json
