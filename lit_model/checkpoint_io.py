"""Our checkpoint directories: read and write state dicts, check, load into a model, and merge LoRA checkpoints.

A checkpoint directory holds `lit_model.pth` (a plain state dict, loadable with `torch.load(mmap=True,
weights_only=True)`), `model_config.yaml` and the tokenizer files. A LoRA fine-tune writes `lit_model.lora.pth` (the
adapters only) and `hyperparameters.yaml` (its base model's directory and the LoRA settings) instead of
`lit_model.pth`; `merge_lora_checkpoint` folds such a directory into a full one. Conversion to and from Hugging Face
checkpoints lives in `lit_model.hf.convert`. Needs torch, yaml and (for .safetensors files) safetensors only.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch

from lit_model.config import Config
from lit_model.errors import (
    CorruptFileError, DiskFullError, disk_full_as_error, disk_full_error, is_disk_full, load_failure_cause,
)
from lit_model.integrity import CHECKSUMMED_NAMES, HashingWriter, add_missing_checksums, record_checksum, verify_file
from lit_model.model import GPT
from lit_model.precision import PRECISIONS, param_dtype
from lit_model.tokenizer import TOKENIZER_FILES

# The bundled demo model: the default --checkpoint_dir of the finetune and generate scripts.
DEMO_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "demo"
WEIGHTS_NAME = "lit_model.pth"
CONFIG_NAME = "model_config.yaml"
# Kept next to the weights: generation reads the stop tokens from it (lit_model.tokenizer lists it too).
GENERATION_CONFIG_NAME = "generation_config.json"
LORA_WEIGHTS_NAME = "lit_model.lora.pth"  # a LoRA fine-tune's adapters (lit_model.lora.lora_state_dict)
HPARAMS_NAME = "hyperparameters.yaml"  # a fine-tuning run's arguments; for LoRA: base model and LoRA settings
PROMPT_STYLE_NAME = "prompt_style.yaml"  # lit_model.prompts writes it
MERGED_DIR_NAME = "merged"  # merge_lora_checkpoint's default output: LORA_DIR/merged


# ---- state dict files -----------------------------------------------------------------------------------------------


def load_state_dict(path: str | Path, verify: Optional[bool] = None) -> dict[str, torch.Tensor]:
    """Read a plain state dict (name -> tensor) from a `.pth`/`.bin` or `.safetensors` file.

    `.pth`/`.bin` files are memory-mapped (`torch.load(mmap=True, weights_only=True)`): tensors are paged in when
    used. A dict `{"model": state_dict, ...}` (a training checkpoint) yields its "model" entry. Pickled objects
    (e.g. a whole `nn.Module`) are refused, since unpickling them could run arbitrary code.
    When the file's directory has a checksums.json that lists it (our checkpoint directories), the file is checked
    against it first (`lit_model.integrity`; `verify=False` or LIT_VERIFY_CHECKSUMS=0 skips that). A truncated, empty
    or corrupt file raises CorruptFileError naming it and saying what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {str(path)!r}")
    verify_file(path, verify)
    corrupt = (
        "It is probably truncated or damaged (an interrupted download, copy or save): re-download or re-convert it; "
        "for a training checkpoint, resume from an older step-NNNNNN directory."
    )
    if path.stat().st_size == 0:
        raise CorruptFileError(f"{path} is empty (0 bytes), so it holds no weights. {corrupt}")
    refusal = (
        f"{path} is not a plain state dict. Only plain state dicts (a dict of name -> tensor, as written by "
        "`torch.save(model.state_dict(), path)`) and .safetensors files are accepted"
    )
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except SafetensorError as err:
            raise CorruptFileError(f"{path} is not a valid .safetensors file ({err}). {corrupt}") from err
    try:
        try:
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            # Files in torch's pre-1.6 (non-zip) format cannot be memory-mapped: read them whole.
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{refusal}; loading it with weights_only=True failed: {load_failure_cause(err)}.") from err
    except PermissionError:
        raise
    except (EOFError, OSError, RuntimeError) as err:
        raise CorruptFileError(f"{path} cannot be read as a checkpoint: {load_failure_cause(err)}. {corrupt}") from err
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise ValueError(f"{refusal}; it holds a {type(obj).__name__}.")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if bad:
        raise ValueError(f"{refusal}; these entries are not tensors: {preview(bad)}.")
    return obj


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write a state dict atomically: a temporary file in the same directory, fsync, then `os.replace`.

    Readers see the old file or the complete new one, never a partial write. A `.safetensors` path writes
    safetensors (tensors that share memory, such as tied embeddings, are stored once each); anything else `torch.save`.
    A weight file of a checkpoint directory (`lit_model.integrity.CHECKSUMMED_NAMES`) gets its checksum recorded in
    the directory's checksums.json, hashed as it is written. A full disk raises DiskFullError (the old file stays).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    checksummed = path.name in CHECKSUMMED_NAMES
    try:
        with disk_full_as_error(path, intact=f"the previous {path.name}, if any, is intact"):
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it a normal file's permissions
            with os.fdopen(fd, "wb") as f:
                writer = HashingWriter(f) if checksummed else f
                if path.suffix == ".safetensors":
                    from safetensors.torch import save

                    writer.write(save(_unshared(state_dict), metadata={"format": "pt"}))
                else:
                    torch.save(dict(state_dict), writer)
                f.flush()
                os.fsync(f.fileno())
            if checksummed:  # a crash between the two steps leaves no entry (unchecked), never a wrong one
                record_checksum(path, None)
            os.replace(tmp, path)
            if checksummed:
                record_checksum(path, writer.entry())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _unshared(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, each with memory of its own (safetensors refuses tensors that share memory)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if ptr in seen and tensor.numel() else tensor
        seen.add(ptr)
    return out


def fsync_tree(directory: Path) -> None:
    """Persist every file and directory under `directory` (before it is renamed into place): after a power cut the
    renamed directory must not hold empty or partial files, which a rename alone does not guarantee."""
    for root, dirs, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def fsync_dir(directory: Path) -> None:
    """Persist a rename (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- weight files of other formats ----------------------------------------------------------------------------------


def hf_weight_files(directory: Path) -> list[Path]:
    """The weight files of a Hugging Face checkpoint: safetensors preferred, then PyTorch .bin; shards in order.

    An `*.index.json` names the shards when present. Mistral's `consolidated.safetensors` (the same weights under
    other names), hidden files (temporary files, macOS `._*` forks) and training state are skipped.
    """

    def wanted(path: Path) -> bool:
        name = path.name
        return not name.startswith((".", "consolidated")) and name not in ("training_args.bin", "optimizer.bin")

    for suffix in (".safetensors", ".bin"):
        index = [p for p in sorted(directory.glob(f"*{suffix}.index.json")) if wanted(p)]
        if index:
            weight_map = json.loads(index[0].read_text())["weight_map"]
            return [directory / name for name in dict.fromkeys(weight_map.values())]
        files = [p for p in sorted(directory.glob(f"*{suffix}")) if wanted(p)]
        if files:
            return files
    return []



# ---- checkpoint directories -----------------------------------------------------------------------------------------


def check_checkpoint_dir(checkpoint_dir: str | Path, need_weights: bool = True) -> Path:
    """The directory as a Path if it holds model_config.yaml (and lit_model.pth when `need_weights`).

    Otherwise a FileNotFoundError says what is missing and which command makes it.
    """
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"Checkpoint directory {str(directory)!r} does not exist. {download_hint(directory)}")
    wanted = (WEIGHTS_NAME, CONFIG_NAME) if need_weights else (CONFIG_NAME,)
    missing = [name for name in wanted if not (directory / name).is_file()]
    if not missing:
        return directory
    if (directory / "config.json").is_file() and hf_weight_files(directory):
        fix = (
            "It holds Hugging Face weights: convert them with "
            f"`python scripts/convert_hf_checkpoint.py --checkpoint_dir {directory}`."
        )
    elif need_weights and (directory / LORA_WEIGHTS_NAME).is_file():
        fix = (
            "It holds LoRA weights only: merge them into their base model with "
            f"`python scripts/merge_lora.py --checkpoint_dir {directory}`, or pass the base model's directory."
        )
    else:
        fix = download_hint(directory)
    raise FileNotFoundError(f"Checkpoint directory {str(directory)!r} lacks {' and '.join(missing)}. {fix}")


def download_hint(directory: Path) -> str:
    """The command that fetches the model a (missing or incomplete) checkpoint directory should hold."""
    parts = directory.parts
    if len(parts) >= 3 and parts[-3] == "checkpoints":  # checkpoints/ORG/NAME names its Hugging Face repository
        return f"Download and convert the model with `python scripts/download.py --repo_id {parts[-2]}/{parts[-1]}`."
    return (
        "Download and convert a model with `python scripts/download.py --repo_id ORG/NAME` (it lands in "
        "checkpoints/ORG/NAME; `--help` lists the known models), then pass that directory."
    )


def save_checkpoint_dir(
    checkpoint_dir: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    config: Config,
    copy_files_from: Optional[str | Path] = None,
) -> Path:
    """Write a checkpoint directory: lit_model.pth (atomically), model_config.yaml, and the tokenizer files and
    generation_config.json copied from `copy_files_from` (those of them that exist there)."""
    directory = Path(checkpoint_dir)
    directory.mkdir(parents=True, exist_ok=True)
    save_state_dict(state_dict, directory / WEIGHTS_NAME)
    config.save(directory / CONFIG_NAME)
    if copy_files_from is not None:
        copy_support_files(copy_files_from, directory)
    return directory


def copy_support_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer files and generation_config.json that exist in `src` to `dst`; the names copied."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in dict.fromkeys((*TOKENIZER_FILES, GENERATION_CONFIG_NAME)):
        if (src / name).is_file() and (src / name).resolve() != (dst / name).resolve():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


# ---- loading into a model -------------------------------------------------------------------------------------------


def load_checkpoint(
    model: torch.nn.Module,
    path: str | Path,
    strict: bool = True,
    missing_ok: Optional[Callable[[str], bool]] = None,
    dtype: Optional[torch.dtype] = None,
    verify: Optional[bool] = None,
) -> list[str]:
    """Load a state dict file into `model` (which may live on the meta device) with `assign=True`.

    The model takes the checkpoint's tensors (memory-mapped), each floating-point one cast as it is taken: to `dtype`
    when given, else to the dtype of the model's own tensor unless that one is on the meta device (then the stored
    dtype stays). So a model built for a precision keeps that precision whatever the file stores, and peak memory is
    the model plus one tensor being cast. With tied embeddings the LM head is re-tied to the embedding, whether or not
    the file holds an `lm_head.weight` entry. Shape mismatches always raise; missing and unexpected keys raise when
    `strict`, except missing keys for which `missing_ok(key)` is True (parameters the caller initialises itself, e.g.
    LoRA's). Returns the missing keys that `missing_ok` allowed. `verify`: see `load_state_dict` (checksums).
    """
    state = load_state_dict(path, verify)
    expected = model.state_dict(keep_vars=True)
    tied = _is_tied(model)
    if tied:
        expected.pop("lm_head.weight", None)
        head = state.pop("lm_head.weight", None)
        if head is not None and "transformer.wte.weight" not in state:
            state["transformer.wte.weight"] = head
    absent, unexpected, mismatched = compare_keys(expected, state)
    allowed = [k for k in absent if missing_ok is not None and missing_ok(k)]
    missing = [k for k in absent if k not in allowed]
    if mismatched or (strict and (missing or unexpected)):
        raise ValueError(mismatch_message(str(path), missing, unexpected, mismatched))
    model.load_state_dict({k: _cast(v, expected[k], dtype) for k, v in state.items() if k in expected}, strict=False,
                          assign=True)
    if tied:
        model.lm_head.weight = model.transformer.wte.weight
    return allowed


def _cast(tensor: torch.Tensor, current: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """A loaded tensor in the dtype its model slot asks for (see `load_checkpoint`); integer tensors stay as stored."""
    if not tensor.is_floating_point() or not current.is_floating_point():
        return tensor  # e.g. a 4-bit weight's packed bytes, or an integer buffer
    target = dtype if dtype is not None else (None if current.is_meta else current.dtype)
    return tensor if target is None or tensor.dtype == target else tensor.to(target)


def compare_keys(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """Keys missing from `found`, keys `expected` lacks, and "key: file (shape), model (shape)" for shape mismatches.

    Shared with lit_model.hf.convert, as is `mismatch_message`.
    """
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [
        f"{k}: file {tuple(v.shape)}, model {tuple(expected[k].shape)}"
        for k, v in found.items()
        if k in expected and v.shape != expected[k].shape
    ]
    return missing, unexpected, mismatched


def _is_tied(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "tie_embeddings", False))


def mismatch_message(
    source: str, missing: list[str], unexpected: list[str], mismatched: list[str], advice: Optional[str] = None
) -> str:
    """A user-facing error text listing what differs between a weight file and its model, and what to do."""
    lines = [f"The weights in {source} do not match the model its config describes:"]
    if missing:
        lines.append(f"  missing from the weights ({len(missing)}): {preview(missing)}")
    if unexpected:
        lines.append(f"  not in the model ({len(unexpected)}): {preview(unexpected)}")
    if mismatched:
        lines.append(f"  shape differs ({len(mismatched)}): {preview(mismatched)}")
    lines.append(
        advice
        or "The config (model_config.yaml, config.json or --model_name) and the weights must describe the same model "
        "(same layer count, sizes, architecture). Re-convert with the config that belongs to these weights."
    )
    return "\n".join(lines)


def preview(items: list[str], limit: int = 8) -> str:
    """The first `limit` items, comma-separated, and how many more there are."""
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def load_model(
    checkpoint_dir: str | Path, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None
) -> GPT:
    """The GPT of a checkpoint directory, in eval mode (call `.train()` to train it).

    Built on the meta device, so no memory goes to random initialisation; the weights are memory-mapped and each is
    cast to `dtype` as it is assigned (default: the stored dtype; `lit_model.precision.param_dtype` gives the dtype
    of a Fabric precision), then moved to `device`. Tied embeddings stay tied.
    """
    directory = check_checkpoint_dir(checkpoint_dir)
    config = Config.from_checkpoint(directory)
    with torch.device("meta"):
        model = GPT(config)
    load_checkpoint(model, directory / WEIGHTS_NAME, dtype=dtype)
    return model.to(device).eval()




def parse_dtype(dtype: Optional[str | torch.dtype]) -> Optional[torch.dtype]:
    """A floating-point torch dtype from its name ("bfloat16", "torch.float16", ...) or a Fabric precision (its
    parameter dtype: "bf16-true" -> bfloat16, "32-true" and "bf16-mixed" -> float32); None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) in PRECISIONS:
        return param_dtype(str(dtype))
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(
            f"Unknown dtype {dtype!r}: use one of float32, bfloat16, float16 (or a precision: 32-true, bf16-true, "
            "16-true, bf16-mixed; or leave it unset)."
        )
    return value


# Temporary names next to a directory being written (write_dir_atomically): ".NAME.tmp-PID" is being filled,
# ".NAME.old-PID" is the version it replaces, for a moment. A killed process leaves them behind; see
# lit_model.resume.cleanup_stale.
LEFTOVER_DIR = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")


def leftover_name(target: Path, kind: str, pid: Optional[int] = None) -> Path:
    """The temporary sibling of `target` of `kind` "tmp" or "old" (see LEFTOVER_DIR)."""
    return target.with_name(f".{target.name}.{kind}-{os.getpid() if pid is None else pid}")


def write_dir_atomically(
    target: str | Path, fill: Callable[[Path], None], replace: bool = False, intact: Optional[str] = None
) -> Path:
    """Create directory `target` complete or not at all: `fill` writes into a temporary sibling, which is renamed.

    Before the rename, the weight files get their checksums (lit_model.integrity; those `fill` wrote with
    `save_state_dict` have them already) and every file and directory is fsynced, so after a crash or power cut
    `target` is the old complete version or the new complete one. If `fill` raises, the temporary directory is removed
    and `target` is left as it was; a full disk raises DiskFullError saying so.
    `target` must not exist or be an empty directory, unless `replace`: then an existing `target` is swapped for the
    new one (moved aside to ".NAME.old-PID", the new one renamed in, the old one deleted; a crash in between leaves
    the old one there for `lit_model.resume.cleanup_stale` to put back). `intact`: what the DiskFullError message
    says is intact (default: the previous `target`, or what was in its parent directory).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not replace and target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not empty: write to another directory, or delete it first.")
    tmp = leftover_name(target, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if intact is None:
        intact = f"the previous {target.name} is intact" if target.exists() else (
            f"what was in {target.parent} before is intact")
    try:
        try:
            fill(tmp)
            add_missing_checksums(tmp)
            fsync_tree(tmp)
        except Exception as err:  # a DiskFullError from save_state_dict too: say it about `target`, not the tmp file
            if not (isinstance(err, DiskFullError) or is_disk_full(err, tmp)):
                raise
            raise disk_full_error(target, written_bytes=_tree_bytes(tmp), intact=intact) from err
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished `tmp` to `target`, swapping out an existing `target` (see write_dir_atomically)."""
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()  # rename cannot replace a directory on every platform
    old = leftover_name(target, "old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(old, target)  # put the old version back: never leave no `target` behind
            raise
    else:
        os.replace(tmp, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def _tree_bytes(directory: Path) -> int:
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total
