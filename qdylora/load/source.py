"""What a `--model` argument names: a local folder, a .gguf file or a Hugging Face hub id (its snapshot on disk).

`resolve_model` checks it without reading any weight (existence, config.json, weight files, every
safetensors header), so a bad `--model` fails in a second with one line saying what to pass instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError
from .checkpoint import INDEX_NAME, SINGLE_NAME, has_safetensors, index_weight_map, shard_plan

# what from_pretrained can read besides safetensors (the layer-by-layer loader reads safetensors only)
BIN_PATTERNS = ("pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json")
# the small files of a hub snapshot: config, safetensors index, generation config, tokenizer, chat template
HUB_SMALL_FILES = ["*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken"]
PASS = "pass a folder with config.json and *.safetensors (as save_pretrained writes it), a .gguf file or a hub id"


@dataclass(frozen=True)
class ModelSource:
    """A model argument, resolved: where its files are and what the loaded model is called."""

    folder: Path  # local folder with config.json (a hub id's snapshot), or the folder of the .gguf file
    name: str  # config._name_or_path, as from_pretrained sets it
    source: str  # what to pass as --model to load this base again (qdylora_source)
    gguf_file: str | None = None
    safetensors: bool = False  # True: the layer-by-layer loader can read the weights
    hub_id: str | None = None  # set for a hub id whose weights from_pretrained still has to fetch (.bin only)

    @property
    def pretrained_path(self) -> str:
        """What to give from_pretrained / AutoTokenizer."""
        return self.hub_id or str(self.folder)


def _is_hub_id(text: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if text.startswith((".", "~")) or Path(text).is_absolute():
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _why_not(e: BaseException) -> str:
    """Why a hub download failed, in a few words."""
    from huggingface_hub.constants import is_offline_mode
    from huggingface_hub.errors import LocalEntryNotFoundError

    if isinstance(e, LocalEntryNotFoundError):
        if is_offline_mode():
            return "offline (HF_HUB_OFFLINE is set) and not in the local cache"
        return "the hub cannot be reached and it is not in the local cache"
    return first_line(e)


def _check_folder(folder: Path, shown: str) -> bool:
    """Raise ModelLoadError unless `folder` holds a loadable model; True when its weights are safetensors."""
    if not (folder / "config.json").is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        if ggufs:
            raise ModelLoadError(f"model folder {shown} has no config.json but holds {ggufs[0].name}; "
                                 f"pass the .gguf file itself: --model {folder / ggufs[0].name}")
        if (folder / "adapter_config.json").is_file():
            raise ModelLoadError(f"{shown} is an adapter folder (adapter_config.json), not a base model; "
                                 "pass the base model it was trained on")
        raise ModelLoadError(f"model folder {shown} has no config.json; {PASS}")
    try:
        json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelLoadError(f"{folder / 'config.json'} is not valid JSON ({first_line(e)}); "
                             "re-save the model with save_pretrained") from None
    if has_safetensors(folder):
        shard_plan(folder)  # every shard present, with a readable header
        return True
    if any(next(folder.glob(p), None) for p in BIN_PATTERNS):
        return False
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    extra = f" ({', '.join(found[:3])} are not a model.safetensors checkpoint)" if found else ""
    raise ModelLoadError(f"model folder {shown} has config.json but no weights: no model.safetensors, "
                         f"model.safetensors.index.json + shards or pytorch_model*.bin{extra}; {PASS}")


def resolve_model(model: str) -> ModelSource:
    """Resolve a model argument (folder, .gguf file, hub id) and check its files; raises ModelLoadError."""
    text = str(model)
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {text} does not exist; pass an existing .gguf file, a model folder "
                                 "or a hub id")
        return ModelSource(folder=path.parent, name=path.name, source=str(path.resolve()), gguf_file=path.name)
    if path.is_dir():
        return ModelSource(folder=path, name=str(path), source=str(path.resolve()),
                           safetensors=_check_folder(path, text))
    if path.exists():
        raise ModelLoadError(f"--model {text} is a file; pass the folder that holds config.json or a .gguf file")
    if not _is_hub_id(text):
        raise ModelLoadError(f"model folder {text} does not exist; {PASS}")
    return _resolve_hub(text)


def _resolve_hub(repo_id: str) -> ModelSource:
    """A hub id's snapshot on disk (downloaded unless cached, or only the cache when offline)."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    how = (f"download it where the hub is reachable (`hf download {repo_id} --local-dir DIR`) and pass "
           "--model DIR")
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_SMALL_FILES))
    except (EntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        raise ModelLoadError(f"{repo_id} is not a local folder, and the Hugging Face hub model {repo_id} could not "
                             f"be downloaded ({_why_not(e)}); {how}") from None
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"the hub model {repo_id} has no config.json in {folder}; {how}")
    index = folder / INDEX_NAME
    try:
        for shard in sorted(set(index_weight_map(index).values())) if index.is_file() else [SINGLE_NAME]:
            hf_hub_download(repo_id, shard)
    except LocalEntryNotFoundError as e:
        if index.is_file():
            raise ModelLoadError(f"the weights of hub model {repo_id} are not all in the local cache and could not "
                                 f"be downloaded ({_why_not(e)}); {how}") from None
        # no single-file safetensors cached: a .bin-only model may be, which from_pretrained reads
        return ModelSource(folder=folder, name=repo_id, source=repo_id, hub_id=repo_id)
    except EntryNotFoundError:  # the hub has no safetensors checkpoint: from_pretrained fetches the .bin files
        return ModelSource(folder=folder, name=repo_id, source=repo_id, hub_id=repo_id)
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ModelLoadError(f"the weights of hub model {repo_id} could not be downloaded ({first_line(e)}); "
                             f"{how}") from None
    shard_plan(folder)
    return ModelSource(folder=folder, name=repo_id, source=repo_id, safetensors=True)
