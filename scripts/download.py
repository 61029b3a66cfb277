"""Download a model from the Hugging Face Hub into checkpoints/ORG/NAME and convert it to our format."""

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from lit_model.checkpoint_io import GENERATION_CONFIG_NAME, parse_dtype
from lit_model.config import PRESETS
from lit_model.hf.convert import convert_hf_checkpoint
from lit_model.hf.families import config_from_hf
from lit_model.checkpoint_io import hf_weight_files
from lit_model.tokenizer import TOKENIZER_FILES

SAFETENSORS_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
BIN_PATTERNS = ["*.bin", "*.bin.index.json"]
# Mistral's consolidated.safetensors and Llama 3's original/ hold the same weights again, in Meta's format.
IGNORE_PATTERNS = ["consolidated*", "original/*", "training_args.bin", "optimizer.bin"]


def download(
    repo_id: str,
    access_token: Optional[str] = None,
    checkpoint_dir: Path = Path("checkpoints"),
    convert: bool = True,
    dtype: Optional[str] = None,
) -> Path:
    """Download a Hugging Face model into checkpoint_dir/ORG/NAME and convert it to our format.

    Fetches config.json, generation_config.json, the tokenizer files and the weights (safetensors; .bin only where a
    repository has no safetensors), then writes lit_model.pth and model_config.yaml. Remote code is never run.

    Args:
        repo_id: The Hugging Face repository, ORG/NAME. Any llama, mistral, qwen2, gpt_neox, gemma or phi3 model
            works; the presets are: {presets}.
        access_token: A Hugging Face token (https://huggingface.co/settings/tokens), needed for gated models such as
            Llama and Gemma; default: the HF_TOKEN environment variable, else your `hf auth login` token.
        checkpoint_dir: The directory the model lands in, under ORG/NAME.
        convert: Convert the weights to our format after downloading.
        dtype: Store the converted weights in this dtype (float32, bfloat16, float16); default: as downloaded.

    Returns:
        The model's directory.
    """
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"--repo_id must look like ORG/NAME (e.g. EleutherAI/pythia-14m), got {repo_id!r}")
    parse_dtype(dtype)  # fail before downloading gigabytes
    token = access_token or os.environ.get("HF_TOKEN") or None
    target = Path(checkpoint_dir) / repo_id
    _fetch(repo_id, target, token, list(dict.fromkeys(["config.json", GENERATION_CONFIG_NAME, *TOKENIZER_FILES])))
    config_path = target / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{repo_id} has no config.json: it is not a transformers model repository.")
    config_from_hf(json.loads(config_path.read_text()))  # an unsupported architecture fails here, early
    _fetch(repo_id, target, token, SAFETENSORS_PATTERNS)
    if not hf_weight_files(target):
        _fetch(repo_id, target, token, BIN_PATTERNS)
    if not hf_weight_files(target):
        raise FileNotFoundError(f"{repo_id} has no *.safetensors or *.bin weights to download.")
    if convert:
        path = convert_hf_checkpoint(target, dtype=dtype)
        print(f"Converted {repo_id}: {path}")
    return target


def _fetch(repo_id: str, target: Path, token: Optional[str], patterns: list[str]) -> None:
    """snapshot_download the files matching `patterns` into `target`; Hub failures become errors that say what to do."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        snapshot_download(
            repo_id, local_dir=target, allow_patterns=patterns, ignore_patterns=IGNORE_PATTERNS, token=token
        )
    except GatedRepoError as err:  # a subclass of RepositoryNotFoundError: test it first
        raise PermissionError(
            f"{repo_id} is a gated model. Accept its license at https://huggingface.co/{repo_id} while logged in, "
            "create a token at https://huggingface.co/settings/tokens, and pass it with --access_token (or set "
            "HF_TOKEN)." + (" The token given has no access to it yet." if token else " No token was given.")
        ) from err
    except RepositoryNotFoundError as err:
        known = ", ".join(sorted(p["hf_repo"] for p in PRESETS.values()))
        raise FileNotFoundError(
            f"Repository {repo_id!r} was not found on the Hugging Face Hub. Check the spelling (ORG/NAME, case "
            f"matters); a private repository needs --access_token. Known models: {known}."
        ) from err
    except LocalEntryNotFoundError as err:
        raise ConnectionError(_offline_message(repo_id)) from err
    except HfHubHTTPError as err:
        if _status(err) == 401:
            raise PermissionError(
                f"The Hugging Face Hub refused the token for {repo_id} (401). Pass a valid token with --access_token "
                "or HF_TOKEN (https://huggingface.co/settings/tokens)."
            ) from err
        raise
    except Exception as err:
        if _is_connection_error(err):
            raise ConnectionError(_offline_message(repo_id)) from err
        raise


def _offline_message(repo_id: str) -> str:
    message = (
        f"Could not download {repo_id}: the Hugging Face Hub is unreachable and the files are not in the local cache. "
        "Check your internet connection (and proxy settings), then run the command again."
    )
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        message += " HF_HUB_OFFLINE is set: unset it (or set HF_HUB_OFFLINE=0) to allow downloads."
    return message


def _status(err: Any) -> Optional[int]:
    return getattr(getattr(err, "response", None), "status_code", None)


def _is_connection_error(err: Exception) -> bool:
    """Whether `err` is a network failure of one of the HTTP libraries huggingface_hub has used (httpx2, httpx,
    requests). A library that raised it is already imported, so only sys.modules is looked at."""
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    for module_name, class_names in (
        ("httpx2", ("TransportError",)),
        ("httpx", ("TransportError",)),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        module = sys.modules.get(module_name)
        classes = tuple(getattr(module, name) for name in class_names if hasattr(module, name))
        if classes and isinstance(err, classes):
            return True
    return False


# The help of --repo_id lists the presets (jsonargparse reads the docstring).
download.__doc__ = (download.__doc__ or "").replace(
    "{presets}", ", ".join(sorted(p["hf_repo"] for p in PRESETS.values()))
)

if __name__ == "__main__":
    from lit_model.cli import script_main

    script_main(download)
