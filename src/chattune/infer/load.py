"""Read an adapter folder (or a plain model directory) into a `Loaded`: model, tokenizer, system prompt, stops.

adapter/ --read_model_source--> ModelSource --load_for_inference--> Loaded, which `infer` generates with
(chat, serve, predict, evaluation and the trainer's sample predictions); `merge` and `serve_vllm` reuse
the source and tokenizer readers.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chattune.adapter import (
    ADAPTER_WEIGHTS,
    check_adapter_weights,
    check_model_weights,
    read_adapter_config,
    read_inference_info,
    read_safetensors_header,
    stop_ids,
)
from chattune.console import say
from chattune.errors import ChattuneError, ModelError

_DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float": "float32",
}


@dataclass
class Loaded:
    """A model ready to answer: everything generation needs, read from the adapter folder."""

    model: Any  # transformers PreTrainedModel or peft PeftModel, in eval mode
    tokenizer: Any  # left padding, pad token set
    system_prompt: str | None
    end_of_turn_token: str | None
    name: str  # the id clients ask for (serve) and what reports show
    stop_token_ids: list[int]
    max_context: int | None = None  # prompt + answer tokens the model can attend to (serve refuses more)
    adapter_name: str | None = None  # peft adapter to activate before generating (several over one base)


@dataclass(frozen=True)
class ModelSource:
    """Where a MODEL_OR_ADAPTER argument's weights, tokenizer and inference facts come from."""

    path: Path
    adapter_dir: Path | None  # None for a plain model directory
    base_dir: Path
    base_model: str  # as the user wrote it (hub id, builtin:..., path)
    system_prompt: str | None
    end_of_turn_token: str | None
    trust_remote_code: bool = False  # the user's own --trust-remote-code, never a file's say
    label: str | None = None  # a named model's id (builtin:..., hub id, .gguf): what reports and serve show
    template_kwargs: dict | None = None  # data.template_kwargs recorded at training (inference.json)

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        # out/<run>/adapter (or /model, a full fine-tune) -> "<run>": the run name is what a user recognises.
        p = self.path.resolve()
        return p.parent.name if p.name in ("adapter", "model") else p.name


# -- finding the pieces -----------------------------------------------------------------------------------
def _resolve_base(adapter_dir: Path, info: dict, adapter_cfg: dict) -> tuple[Path, str]:
    base_model = info.get("base_model") or adapter_cfg.get("base_model_name_or_path") or ""
    stored = info.get("base_model_path") or adapter_cfg.get("base_model_name_or_path") or ""
    # A relative path is tried from the working directory, then from the adapter (a copied run folder).
    for candidate in (Path(stored).expanduser(), adapter_dir / stored) if stored else ():
        if (candidate / "config.json").is_file():
            return candidate.resolve(), base_model
    if not base_model:
        raise ModelError(
            f"{adapter_dir}: neither inference.json nor adapter_config.json names the base model"
        )
    # The adapter was moved to another machine (or the cache was cleared): fetch the base model again the
    # way training did, so an adapter folder alone is enough (builtin models are rebuilt, bit for bit).
    from chattune.model.resolve import resolve_model_dir

    try:
        return resolve_model_dir(base_model), base_model
    except ModelError as e:
        raise ModelError(f"{adapter_dir}: base model directory '{stored}' does not exist, and {e}") from None


def _warn_remote_code(folders: list[Path], info: dict) -> None:
    """Say which files of a folder ask to run code it ships; none of them is acted on.

    Adapters and models are shared on the hubs: a folder that could turn on `trust_remote_code` for
    itself (inference.json, chattune.yaml) or map a class to its own .py (auto_map) could run anything.
    Only the user's own --trust-remote-code (or `model.trust_remote_code` in a train config) runs code.
    """
    import yaml

    asks = []
    if info.get("trust_remote_code") is True:
        asks.append(f"{folders[0] / 'inference.json'} sets trust_remote_code")
    for folder in dict.fromkeys(folders):
        run_cfg = folder / "chattune.yaml"
        try:
            tree = yaml.safe_load(run_cfg.read_text(encoding="utf-8")) if run_cfg.is_file() else None
        except (OSError, yaml.YAMLError):
            tree = None
        if isinstance(tree, dict) and isinstance(tree.get("model"), dict):
            if tree["model"].get("trust_remote_code") is True:
                asks.append(f"{run_cfg} sets model.trust_remote_code")
        for name in ("tokenizer_config.json", "config.json"):
            try:
                data = json.loads((folder / name).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and data.get("auto_map"):
                asks.append(f"{folder / name} maps classes to code (auto_map)")
    for ask in asks:
        say(
            f"warning: {ask}: ignored, a folder never turns on remote code for itself; pass "
            "--trust-remote-code if you trust the code it ships"
        )


def read_model_source(path: str | Path, *, trust_remote_code: bool = False) -> ModelSource:
    """Classify `path` as an adapter folder or a model directory and find its base model.

    `trust_remote_code`: the user's own flag; what the folder's files say about it is ignored (with a warning).
    """
    p, named = Path(path).expanduser(), None
    if not p.is_dir():  # builtin:..., a .gguf file or a hub id: train's model.name_or_path resolver, verbatim
        from chattune.model.resolve import looks_like_path, resolve_model_dir

        if not p.exists() and looks_like_path(str(path)) and not str(path).lower().endswith(".gguf"):
            raise ModelError(
                f"'{path}' does not exist; pass an adapter folder (<run>/adapter), a model directory, "
                "a .gguf file, builtin:smollm2-135m-instruct or a hub id"
            )
        p, named = resolve_model_dir(str(path)), str(path)
    stored = read_inference_info(p)
    info = dataclasses.asdict(stored) if stored is not None else {}
    if (p / "adapter_config.json").is_file():
        base_dir, base_model = _resolve_base(p, info, read_adapter_config(p))
        adapter_dir: Path | None = p
    elif (p / "config.json").is_file():
        base_dir, base_model, adapter_dir = p, info.get("base_model") or named or str(p), None
    else:
        raise ModelError(
            f"'{path}' is neither an adapter folder (adapter_config.json) nor a model directory (config.json)"
        )
    if not trust_remote_code:
        _warn_remote_code([p, base_dir], info)
    return ModelSource(
        path=p,
        adapter_dir=adapter_dir,
        base_dir=base_dir,
        base_model=base_model,
        system_prompt=info.get("system_prompt"),
        end_of_turn_token=info.get("end_of_turn_token"),
        trust_remote_code=trust_remote_code,
        label=Path(named).stem if named and named.lower().endswith(".gguf") else named,
        template_kwargs=info.get("template_kwargs"),
    )


def _guess_end_of_turn(tokenizer) -> str | None:
    """The special token the template puts right after an assistant answer (Qwen: <|im_end|>)."""
    from jinja2 import TemplateError

    marker = "chattune-answer"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except (ValueError, TemplateError):
        return None
    if marker not in text:
        return None
    ids = tokenizer(text.split(marker, 1)[1], add_special_tokens=False)["input_ids"]
    if ids and ids[0] in tokenizer.added_tokens_decoder:
        return tokenizer.convert_ids_to_tokens(ids[0])
    return None


def _pick(device: str, dtype: str) -> tuple[str, torch.dtype]:
    from chattune.model.load import pick_device, pick_dtype

    device = pick_device(device)
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name not in ("auto", "bfloat16", "float16", "float32"):
        raise ChattuneError(f"dtype '{dtype}': use auto, bfloat16, float16 or float32")
    return device, pick_dtype(name, device)


def load_model_dir(src: ModelSource, dtype: Any, **kwargs):
    """`AutoModelForCausalLM.from_pretrained(src.base_dir)` after its safetensors headers are checked against
    the files' sizes; a folder that does not load (weights that no longer fit `config.json`, a damaged
    file) raises ModelError naming the folder instead of transformers' traceback."""
    from transformers import AutoModelForCausalLM

    check_model_weights(src.base_dir)
    _check_weights_fit_config(src)
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(src.base_dir), dtype=dtype, trust_remote_code=src.trust_remote_code, **kwargs
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AssertionError) as e:
        # RuntimeError: a size mismatch (hidden_size edited, weights of another model); SafetensorError is one.
        # AssertionError: torch's own check of a config that contradicts itself (pad_token_id >= vocab_size)
        raise ModelError(
            f"cannot load the model from '{src.base_dir}': {' '.join(str(e).split())[:300]}{_hint(e)}; re-download it or "
            "point at another folder"
        ) from None


def _check_weights_fit_config(src: ModelSource) -> None:
    """The folder's tensor shapes (safetensors headers) against the model its config.json builds, on the meta
    device (no memory): transformers 5 only logs a mismatch and initialises those weights at random."""
    from transformers import AutoConfig, AutoModelForCausalLM

    files = sorted(src.base_dir.glob("*.safetensors"))
    if not files or src.trust_remote_code:
        return
    try:
        config = AutoConfig.from_pretrained(str(src.base_dir))
        with torch.device("meta"):
            want = {
                k: list(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()
            }
    except Exception:  # noqa: BLE001 - an architecture this check cannot build: from_pretrained decides
        return
    for weights in files:
        for name, (_, shape) in read_safetensors_header(weights).items():
            if name in want and want[name] != shape:
                raise ModelError(
                    f"{weights}: tensor '{name[:100]}' is {shape}, but {src.base_dir / 'config.json'} makes it "
                    f"{want[name]}: the config and the weights are of different models; re-download the folder"
                )


def check_adapter_fits(model, adapter_dir: Path) -> None:
    """Compare every LoRA tensor of `adapter_dir` with the base `model`'s module it applies to, from the
    safetensors header alone: the module exists, `lora_A` is (r, in_features), `lora_B` (out_features, r).

    Raises ModelError naming the tensor before peft copies any weight (peft's own error is a size-mismatch
    traceback, or a silent skip of a tensor naming no module)."""
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    modules = dict(model.named_modules())
    ranks: dict[str, int] = {}
    for name, (_, shape) in read_safetensors_header(path).items():
        stem, dot, part = name.rpartition(".lora_")
        if not dot or part not in ("A.weight", "B.weight"):
            continue
        module = stem.removeprefix("base_model.model.")
        target = modules.get(module)
        if target is None:
            raise ModelError(
                f"{path}: tensor '{name[:100]}' is for module '{module[:80]}', which the base model does not "
                "have: the adapter was trained on another model; check its base model"
            )
        if len(shape) != 2:
            raise ModelError(f"{path}: tensor '{name[:100]}' has shape {shape}; LoRA factors are matrices")
        want = getattr(target, "in_features" if part == "A.weight" else "out_features", None)
        got = shape[1] if part == "A.weight" else shape[0]
        rank = shape[0] if part == "A.weight" else shape[1]
        if (want is not None and got != want) or ranks.setdefault(module, rank) != rank:
            raise ModelError(
                f"{path}: tensor '{name[:100]}' has shape {shape}, which does not fit the base model's "
                f"'{module[:80]}' ({type(target).__name__}, in {getattr(target, 'in_features', '?')}, "
                f"out {getattr(target, 'out_features', '?')}): the adapter was trained on another model"
            )


def attach_adapter(model, adapter_dir: Path, **kwargs):
    """`PeftModel.from_pretrained(model, adapter_dir)` once `check_adapter_fits` has passed; what peft still
    refuses (target_modules naming nothing in the model, a config it cannot build) becomes ModelError."""
    from peft import PeftModel

    check_adapter_fits(model, adapter_dir)
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), **kwargs)
    except (ValueError, RuntimeError, KeyError, TypeError, OSError) as e:
        raise ModelError(
            f"cannot apply the adapter '{adapter_dir}' to its base model: {' '.join(str(e).split())[:300]}; the adapter was "
            "trained for another model, or re-download or retrain it"
        ) from None


def _load_base(src: ModelSource, device: str, dtype: torch.dtype):
    # On a GPU, device_map loads the weights straight there instead of through a full copy in CPU memory.
    on_gpu = {"device_map": device} if device.startswith("cuda") else {}
    model = load_model_dir(src, dtype, **on_gpu)
    return model if on_gpu else model.to(device)


def _hint(e: Exception) -> str:
    if "trust_remote_code" not in str(e):
        return ""
    return " (chattune ran none of the folder's code: pass --trust-remote-code if you trust it)"


def load_source_tokenizer(src: ModelSource, *, for_generation: bool = True):
    """The adapter's tokenizer (or the base's), set up for batched generation unless `for_generation` is off."""
    from transformers import AutoTokenizer

    # The adapter's own copy carries the chat template it was trained with; foreign adapters may lack one.
    tok_dir = (
        src.adapter_dir if src.adapter_dir and (src.adapter_dir / "tokenizer_config.json").is_file() else None
    )
    try:
        tok = AutoTokenizer.from_pretrained(
            str(tok_dir or src.base_dir), trust_remote_code=src.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a tokenizer from '{tok_dir or src.base_dir}': {e}{_hint(e)}") from None
    if not tok.chat_template:
        raise ModelError(f"the tokenizer in '{tok_dir or src.base_dir}' has no chat template")
    check_template_renders(tok, tok_dir or src.base_dir)
    # data.template_kwargs recorded at training (e.g. enable_thinking=False): every prompt built with this
    # tokenizer (chat, predict, eval, serve, GGUF export) then renders as training did.
    from chattune.render.template import set_template_kwargs

    set_template_kwargs(tok, src.template_kwargs or {})
    if not for_generation:  # as saved, for copying into a merged model
        return tok
    tok.padding_side = "left"  # generation appends on the right, so pads must sit on the left
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def check_template_renders(tokenizer, where: Path) -> None:
    """Render the folder's chat template once on a plain conversation, in a guarded call: a template that
    calls `raise_exception`, trips the Jinja sandbox (SecurityError) or is broken raises ModelError naming
    the folder now, not a traceback at the first request. transformers renders in its sandbox."""
    from jinja2 import TemplateError

    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "q"},
    ]
    try:
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as e:  # SecurityError and raise_exception's error are TemplateErrors
        if "system" in str(e).lower():  # templates that take no system message (Gemma): try without one
            try:
                tokenizer.apply_chat_template(messages[1:], tokenize=False, add_generation_prompt=True)
                return
            except Exception:  # noqa: BLE001 - reported below with the first error
                pass
        raise ModelError(
            f"the chat template in '{where}' fails on a plain conversation ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:200]}); restore the folder's tokenizer_config.json / chat_template.jinja"
        ) from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError, OverflowError) as e:
        raise ModelError(
            f"the chat template in '{where}' fails on a plain conversation ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:200]}); restore the folder's tokenizer_config.json / chat_template.jinja"
        ) from None


def _max_context(model, tokenizer) -> int | None:
    cfg = getattr(model.config, "text_config", None) or model.config
    n = getattr(cfg, "max_position_embeddings", None)
    if n is None and tokenizer.model_max_length < 10**7:  # transformers' "no limit" sentinel is ~1e30
        n = tokenizer.model_max_length
    return n


def _finish_loading(src: ModelSource, model, tokenizer, name: str, adapter_name: str | None) -> Loaded:
    eot = src.end_of_turn_token or _guess_end_of_turn(tokenizer)
    return Loaded(
        model=model,
        tokenizer=tokenizer,
        system_prompt=src.system_prompt,
        end_of_turn_token=eot,
        name=name,
        stop_token_ids=stop_ids(tokenizer, eot, getattr(model, "generation_config", None)),
        max_context=_max_context(model, tokenizer),
        adapter_name=adapter_name,
    )


def load_for_inference(
    path: str | Path, *, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False
) -> Loaded:
    """Load an adapter folder over its base model (or a plain model directory) for generation.

    `trust_remote_code`: the user's own flag; nothing in the folder can turn it on.
    """
    src = read_model_source(path, trust_remote_code=trust_remote_code)
    device, torch_dtype = _pick(device, dtype)
    if src.adapter_dir is not None:
        check_adapter_weights(src.adapter_dir)  # before minutes of loading the base
    model = _load_base(src, device, torch_dtype)
    if src.adapter_dir is not None:
        model = attach_adapter(model, src.adapter_dir)
    model.eval()
    return _finish_loading(src, model, load_source_tokenizer(src), src.name, None)


def load_many_for_inference(
    paths: list[str | Path], *, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False
) -> list[Loaded]:
    """Several adapters (and/or models): adapters over the same base share one copy of its weights.

    Each adapter is loaded into the shared PeftModel under its name; `generate` switches to it first.
    """
    sources = [read_model_source(p, trust_remote_code=trust_remote_code) for p in paths]
    for src in sources:
        if src.adapter_dir is not None:
            check_adapter_weights(src.adapter_dir)
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ChattuneError(f"two models would be served under the same name: {names}; give distinct folders")
    device, torch_dtype = _pick(device, dtype)
    shared: dict[Path, Any] = {}  # base dir -> PeftModel holding every adapter on that base
    out = []
    for src, name in zip(sources, names, strict=True):
        if src.adapter_dir is None:
            model = _load_base(src, device, torch_dtype).eval()
            out.append(_finish_loading(src, model, load_source_tokenizer(src), name, None))
            continue
        if src.base_dir not in shared:
            base = _load_base(src, device, torch_dtype)
            shared[src.base_dir] = attach_adapter(base, src.adapter_dir, adapter_name=name).eval()
        else:
            check_adapter_fits(shared[src.base_dir].get_base_model(), src.adapter_dir)
            try:
                shared[src.base_dir].load_adapter(str(src.adapter_dir), adapter_name=name)
            except (ValueError, RuntimeError, KeyError, TypeError, OSError) as e:
                raise ModelError(
                    f"cannot apply the adapter '{src.adapter_dir}': {' '.join(str(e).split())[:300]}"
                ) from None
        out.append(_finish_loading(src, shared[src.base_dir], load_source_tokenizer(src), name, name))
    return out
