"""The Hugging Face Hub: models and data sets named by their Hub id, and uploads of exports.

A Hub id is `org/name`, optionally `org/name@revision` (a branch, tag or commit). Files are
fetched with `huggingface_hub.snapshot_download` into the standard HF cache, so `HF_HOME`,
`HF_HUB_CACHE`, `HF_TOKEN`, `HF_ENDPOINT` and `HF_HUB_OFFLINE` work as for any HF library. Of a model
only its config, generation config, tokenizer files and safetensors weights are fetched; pickle
weights (`pytorch_model.bin`) are never downloaded or read.

Every Hub failure becomes a `SpinError` that says what happened and what to do.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import os
import re

from spin_jax.config import HUB_REPO_ID
from spin_jax.errors import SpinError

# the files of a model repo spin_jax reads (top level only; the weights as safetensors)
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
               "chat_template.jinja", "chat_template.json", "*.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_AT_REVISION = re.compile(HUB_REPO_ID.pattern + r"(@[\w./-]+)?")


def is_hub_id(spec: str) -> bool:
    """`org/name` or `org/name@revision` that is not a path on this machine."""
    return bool(_AT_REVISION.fullmatch(spec)) and not os.path.exists(spec)


def split_revision(spec: str, revision: str | None = None) -> tuple[str, str | None]:
    """('org/name', revision) from `org/name@rev`; an explicit `revision` must agree with it."""
    repo_id, _, at = spec.partition("@")
    if at and revision and at != revision:
        raise SpinError(f"model {spec!r} names revision {at!r} but model.revision is {revision!r}; keep one")
    return repo_id, at or revision


def _what(kind: str, repo_id: str, revision: str | None) -> str:
    """How errors name a repo: "model 'org/name'", with its revision if one was asked for."""
    return f"{kind} {repo_id!r}" + (f" at revision {revision!r}" if revision else "")


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def download_model(spec: str, revision: str | None = None) -> str:
    """The local snapshot directory of the Hub model `spec` (downloaded into the HF cache if needed)."""
    from huggingface_hub import HfApi, constants, snapshot_download

    repo_id, revision = split_revision(spec, revision)
    what = _what("model", repo_id, revision)
    with hub_errors(what, repo_id, revision):
        if not constants.HF_HUB_OFFLINE:  # refuse a repo without safetensors before downloading anything
            info = HfApi().model_info(repo_id, revision=revision)
            _check_weights(what, [s.rfilename for s in info.siblings or []])
        path = snapshot_download(repo_id, revision=revision, allow_patterns=list(MODEL_FILES),
                                 ignore_patterns=["*/*"])
    if not glob.glob(os.path.join(path, "*.safetensors")):  # offline, from a cache that lacks them
        if constants.HF_HUB_OFFLINE:
            raise SpinError(f"{what}: the HF cache ({constants.HF_HUB_CACHE}) holds only part of it (no weights) "
                            "and HF_HUB_OFFLINE is set; run once with HF_HUB_OFFLINE unset to download it")
        _check_weights(what, os.listdir(path))
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise SpinError(f"{what} has no config.json: not a transformers model repo spin_jax can read")
    return path


def cached_file(spec: str, filename: str, revision: str | None = None) -> str | None:
    """One file of the Hub model `spec` if the HF cache holds it (no network), else None."""
    from huggingface_hub import try_to_load_from_cache

    repo_id, revision = split_revision(spec, revision)
    found = try_to_load_from_cache(repo_id, filename, revision=revision)
    return found if isinstance(found, str) else None


def download_file(spec: str, filename: str, revision: str | None = None) -> str:
    """One file of the Hub model `spec` (e.g. its config.json, for `plan`), through the cache."""
    from huggingface_hub import hf_hub_download

    repo_id, revision = split_revision(spec, revision)
    what = _what("model", repo_id, revision)
    with hub_errors(what, repo_id, revision, filename):
        return hf_hub_download(repo_id, filename, revision=revision)


def download_dataset(spec: str, patterns: list[str]) -> str:
    """The local snapshot directory of the Hub data set `spec` holding the files matching `patterns`."""
    from huggingface_hub import snapshot_download

    repo_id, revision = split_revision(spec)
    what = _what("data set", repo_id, revision)
    with hub_errors(what, repo_id, revision, repo_type="dataset"):
        return snapshot_download(repo_id, repo_type="dataset", revision=revision, allow_patterns=patterns)


def push_folder(folder: str, repo_id: str, private: bool = False, message: str = "Upload with spin_jax") -> str:
    """Create `repo_id` (private if asked; kept as it is when it exists) and upload `folder` to its
    main branch in one commit; returns the repo's URL."""
    from huggingface_hub import HfApi

    if not HUB_REPO_ID.fullmatch(repo_id):
        raise SpinError(f"--push-to-hub {repo_id!r}: expected a Hub repo id, org/name")
    api = HfApi()
    with hub_errors(_what("model", repo_id, None), repo_id, None, upload=True):
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message=message)
    return str(url)


def _check_weights(what: str, files: list[str]) -> None:
    """Refuse a repo whose top level (what is fetched) has no safetensors, naming its pickles."""
    names = [f for f in files if "/" not in f]
    if any(fnmatch.fnmatch(n, "*.safetensors") for n in names):
        return
    pickles = sorted(n for n in names if any(fnmatch.fnmatch(n, p) for p in PICKLE_WEIGHTS))
    if pickles:
        raise SpinError(
            f"{what} has only pickle weights ({', '.join(pickles[:3])}), no safetensors. spin_jax refuses "
            "pickle files: loading one runs whatever code it holds. Use a revision with safetensors (the Hub's "
            "conversion bot often left one as refs/pr/N: set model.revision), or convert it where you trust "
            "the file (transformers: save_pretrained(..., safe_serialization=True)) and pass the directory")
    raise SpinError(f"{what} has no weights spin_jax can read (no *.safetensors); for a GGUF file, download it "
                    "and pass its path")


@contextlib.contextmanager
def hub_errors(what: str, repo_id: str, revision: str | None, filename: str | None = None,
               repo_type: str = "model", upload: bool = False):
    """huggingface_hub's exceptions as SpinErrors that say what to do."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hub

    transport = _transport_errors()
    page = f"{endpoint()}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
    try:
        yield
    except hub.GatedRepoError as e:
        why = "no valid HF_TOKEN was sent" if _status(e) == 401 else "the token's account has no access yet"
        raise SpinError(f"{what} is gated ({why}): accept its terms at {page} while logged in, then set HF_TOKEN "
                        "to a read token of that account (or run `hf auth login`)") from None
    except hub.RevisionNotFoundError:
        raise SpinError(f"{what}: the repo has no revision {revision!r} (a branch, tag or commit sha); see "
                        f"{page}/tree/main for its branches") from None
    except hub.RepositoryNotFoundError as e:
        if upload:
            raise SpinError(f"{what}: the Hub refused the upload ({_status(e)}): set HF_TOKEN to a token with "
                            "write access to that namespace") from None
        local = "" if repo_type == "dataset" else ", and there is no local directory or file of that name"
        raise SpinError(f"{what} was not found on the Hub ({endpoint()}){local}. Check the id; a private repo "
                        "needs HF_TOKEN set to a token that can read it") from None
    except hub.LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise SpinError(f"{what} is not in the HF cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set; "
                            "run once with HF_HUB_OFFLINE unset to download it") from None
        raise SpinError(f"{what}: could not reach the Hub at {endpoint()} and it is not in the HF cache "
                        f"({constants.HF_HUB_CACHE}); check the network (or HF_ENDPOINT)") from None
    except hub.EntryNotFoundError:
        raise SpinError(f"{what} has no file {filename!r}") from None
    except hub.OfflineModeIsEnabled:
        raise SpinError(f"{what}: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it") from None
    except hub.HfHubHTTPError as e:
        status = _status(e)
        if upload and status in (401, 403):
            raise SpinError(f"{what}: the Hub refused the upload ({status}): set HF_TOKEN to a token with write "
                            "access to that namespace") from None
        raise SpinError(f"{what}: the Hub answered {status or 'an error'}: "
                        f"{(str(e).splitlines() or [''])[0]}") from None
    except transport as e:
        raise SpinError(f"{what}: could not reach the Hub at {endpoint()} ({e}); check the network, or set "
                        "HF_HUB_OFFLINE=1 to use only the HF cache") from None


def _transport_errors() -> tuple:
    """The HTTP client's network errors (huggingface_hub 2.x uses httpx2), and the OS's."""
    errors: list = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            errors.append(__import__(module).TransportError)
    return tuple(errors)


def _status(e) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)
