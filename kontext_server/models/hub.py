"""Where `--model` (a hub id or a diffusers directory) is, and the one start-up message for each way it is not there.

What: `locate(model)` returns where the pipeline is loaded from and what /health says about it:
- a local directory: loaded as it is (it must hold model_index.json);
- a hub id with `HF_HUB_OFFLINE=1`: the snapshot of the local Hugging Face cache (`HF_HUB_CACHE`,
  `models--org--name/snapshots/<commit>/`, found through `refs/main`, files linked to `blobs/`), loaded as a
  directory: nothing contacts the hub;
- a hub id online: `model_index.json` is fetched first (cheap), so a gated repository, a missing one or an
  unreachable hub is told apart by huggingface_hub's own errors before from_pretrained downloads anything.
Every weight file of a directory or snapshot is header-checked first (safetensors_file.check_directory): a
truncated or missing file is named. `load_pipeline` runs from_pretrained and turns what it raises into the same
messages.
Messages (docs/operations.md, "Loading weights", quotes them): gated -> accept the licence on the model page and set
HF_TOKEN; missing -> check the id or the path looked at; offline miss -> the cache path looked at and how to fill it.
Each is a ModelLoadError: `serve` prints `error: <message>` and exits 1, with no traceback.
Limits: the default revision only (refs/main); the cache directory is HF_HUB_CACHE, else huggingface_hub's default.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kontext_server import settings
from kontext_server.models import ModelLoadError
from kontext_server.models.safetensors_file import check_directory

HUB_URL = "https://huggingface.co"
TINY_HINT = "For an offline test model use --model tiny (or --model synthetic-full on a GPU for speed tests)."


@dataclass
class Location:
    target: str  # what from_pretrained is given: a directory, or the hub id
    local_dir: Path | None  # the pipeline's directory when it is on disk before the load
    origin: dict  # /health's model.origin
    kwargs: dict = field(default_factory=dict)  # from_pretrained's hub arguments


def hub_cache() -> Path:
    """HF_HUB_CACHE if set, else huggingface_hub's own (HF_HOME/hub, ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return Path(settings.HF_HUB_CACHE.get() or constants.HF_HUB_CACHE).expanduser()


def offline() -> bool:
    from huggingface_hub import constants

    return settings.is_true(settings.HF_HUB_OFFLINE) or bool(constants.HF_HUB_OFFLINE)


def token() -> str | None:
    return settings.HF_TOKEN.get() or settings.HF_TOKEN_LEGACY.get()


def repo_folder(repo_id: str) -> str:
    return "models--" + repo_id.replace("/", "--")


# ---- the messages ---------------------------------------------------------------------------------------------------
def gated_message(repo_id: str) -> str:
    have = ("the token in HF_TOKEN has no access to it" if token() else "HF_TOKEN is not set")
    return (f"{repo_id} is a gated repository on the Hugging Face Hub and {have}. To load it: accept the licence at "
            f"{HUB_URL}/{repo_id} while logged in, then set HF_TOKEN to a read token of that account "
            f"({HUB_URL}/settings/tokens). Or pass a local copy: --model /path/to/diffusers-directory.")


def missing_message(repo_id: str, path: Path) -> str:
    private = " (or it is private and HF_TOKEN gives no access)" if token() else " (or it is private: set HF_TOKEN)"
    return (f"{repo_id!r} is neither a local directory ({path} does not exist) nor a repository on the Hugging Face "
            f"Hub{private}. Check the id or the path. {TINY_HINT}")


def offline_miss_message(repo_id: str, cache: Path) -> str:
    folder = cache / repo_folder(repo_id)
    if not cache.is_dir():
        found = f"the cache directory {cache} does not exist"
    elif not folder.is_dir():
        found = f"{folder} does not exist"
    elif not (folder / "refs" / "main").is_file():
        snaps = sorted(p.name for p in (folder / "snapshots").glob("*")) if (folder / "snapshots").is_dir() else []
        found = (f"{folder} has no refs/main" + (f" (snapshots: {', '.join(snaps)}; pass one as --model "
                                                 f"{folder}/snapshots/<commit>)" if snaps else ""))
    else:
        found = f"the snapshot refs/main names in {folder} has no model_index.json"
    return (f"{repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it: {found}. "
            f"Download it on a machine with network (`hf download {repo_id}`) and copy its cache here, point "
            f"HF_HUB_CACHE at the cache that holds it, or pass a diffusers directory as --model. {TINY_HINT}")


def unreachable_message(repo_id: str, cache: Path, exc: Exception) -> str:
    return (f"could not reach the Hugging Face Hub to download {repo_id!r} ({_first_line(exc)}), and it is not in the "
            f"cache at {cache / repo_folder(repo_id)}. Check the network, or set HF_HUB_OFFLINE=1 with a cache that "
            "holds it.")


def hub_error_message(repo_id: str, exc: BaseException) -> str | None:
    """The message for a huggingface_hub error anywhere in `exc`'s chain, or None if there is none."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError)

    seen = exc
    while seen is not None:
        if isinstance(seen, GatedRepoError):  # a subclass of RepositoryNotFoundError: first
            return gated_message(repo_id)
        if isinstance(seen, RepositoryNotFoundError):
            return missing_message(repo_id, Path(repo_id).expanduser().absolute())
        if isinstance(seen, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return (offline_miss_message(repo_id, hub_cache()) if offline()
                    else unreachable_message(repo_id, hub_cache(), seen))
        if isinstance(seen, HfHubHTTPError):
            return f"the Hugging Face Hub refused {repo_id!r}: {_first_line(seen)}"
        seen = seen.__cause__ or seen.__context__
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


# ---- where the pipeline is ------------------------------------------------------------------------------------------
def _looks_like_path(model: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if model.startswith(("/", ".", "~")) or model.count("/") > 1:
        return True
    try:
        validate_repo_id(model)
    except HFValidationError:
        return True
    return False


def locate(model: str, skip: tuple[str, ...] = ()) -> Location:
    """Where `model` is; ModelLoadError with the message when it is nowhere. `skip`: subfolders that will not be
    loaded from it (a transformer given by --transformer), left out of the file checks."""
    path = Path(model).expanduser()
    if path.exists():
        if path.is_file():
            raise ModelLoadError(f"{path} is a file: --model takes a diffusers directory or a hub id (a single "
                                 "transformer file goes to --transformer, with the rest of the pipeline from --model)")
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"{path}: the directory has no model_index.json (expected a diffusers "
                                 f"FluxKontextPipeline folder). {TINY_HINT}")
        check_directory(path, skip)
        return Location(str(path), path, {"kind": "directory", "path": str(path.resolve())},
                        {"local_files_only": True})
    if _looks_like_path(model):
        raise ModelLoadError(f"{path.absolute()}: no such directory (and {model!r} is not a hub id). {TINY_HINT}")
    return _locate_offline(model, skip) if offline() else _locate_online(model)


def _locate_offline(repo_id: str, skip: tuple[str, ...]) -> Location:
    from huggingface_hub import try_to_load_from_cache

    cache = hub_cache()
    found = try_to_load_from_cache(repo_id, "model_index.json", cache_dir=cache)
    if not isinstance(found, str):  # None, or the "known not to exist" marker
        raise ModelLoadError(offline_miss_message(repo_id, cache))
    snapshot = Path(found).parent
    check_directory(snapshot, skip)
    return Location(str(snapshot), snapshot,
                    {"kind": "hf-cache", "offline": True, "repo_id": repo_id, "revision": snapshot.name,
                     "path": str(snapshot), "cache": str(cache)},
                    {"local_files_only": True})


def _locate_online(repo_id: str) -> Location:
    from huggingface_hub import hf_hub_download

    cache = hub_cache()
    try:
        index = Path(hf_hub_download(repo_id, "model_index.json", cache_dir=cache, token=token()))
    except Exception as exc:
        message = hub_error_message(repo_id, exc)
        if message is None:
            raise ModelLoadError(f"could not fetch {repo_id}/model_index.json from the Hugging Face Hub: "
                                 f"{type(exc).__name__}: {_first_line(exc)}") from exc
        raise ModelLoadError(message) from None
    on_disk = index.parent if (index.parent / "transformer" / "config.json").is_file() else None
    return Location(repo_id, on_disk, {"kind": "hub", "offline": False, "repo_id": repo_id, "cache": str(cache)},
                    {"cache_dir": str(cache), "token": token()})


def load_pipeline(location: Location, dtype, **components):
    """FluxKontextPipeline.from_pretrained at `location` (`components`: ones given instead of loaded, e.g. the
    transformer from --transformer); its errors as ModelLoadError with the messages above."""
    from diffusers import FluxKontextPipeline

    try:
        return FluxKontextPipeline.from_pretrained(location.target, dtype=dtype, **location.kwargs, **components)
    except Exception as exc:
        repo_id = location.origin.get("repo_id")
        message = hub_error_message(repo_id, exc) if repo_id else None
        if message is None:
            where = location.origin.get("path") or location.target
            raise ModelLoadError(f"could not load the pipeline from {where}: {type(exc).__name__}: "
                                 f"{_first_line(exc)}") from exc
        raise ModelLoadError(message) from None
