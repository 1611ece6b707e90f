"""Export a fine-tune to GGUF, the file llama.cpp and Ollama run: `chattune export ADAPTER --format gguf`.

adapter/ (or a merged model directory) --merge in memory (merge.load_merged)--> one transformers model
  --tensor names from gguf's own tables (llama: Q/K rows permuted as llama.cpp's converter does)-->
  FILE.gguf: f16 | bf16 | q8_0 (gguf.quants), the tokenizer (vocabulary, merges, token types,
  eos = the end-of-turn token the run trained), the chat template with the run's system prompt as its default
  + FILE.Modelfile for `ollama create` (FROM, TEMPLATE, PARAMETER stop, SYSTEM).
Both are written under temporary names and renamed, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from chattune.adapter import read_inference_info, stop_ids
from chattune.console import say
from chattune.errors import ChattuneError, ModelError
from chattune.files import atomic_path, check_output_path, remove_stale_temporaries

ARCHITECTURES = ("llama", "qwen2")  # transformers model_type == llama.cpp architecture name


DTYPES = ("f16", "bf16", "q8_0")

# The text splits llama.cpp knows by name (tokenizer.ggml.pre), keyed by the tokenizer.json pre-tokenizer
# that does the same split. A tokenizer splitting another way would give other ids in llama.cpp than in
# training, so it is refused rather than exported under a guessed name.
_GPT2_REGEX = {"type": "ByteLevel", "use_regex": True}


_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Ollama's ChatML template (its docs' form): a Modelfile SYSTEM becomes the first message when a request
# has none, as the exported Jinja template does with the run's system prompt.
OLLAMA_CHATML = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)


def export_gguf(model_path: str | Path, output: str | Path, dtype: str = "f16") -> tuple[Path, Path]:
    """Write `output` (a new .gguf file) and `<stem>.Modelfile` beside it; return both paths.

    `model_path` is an adapter folder (merged into its base here, in memory, as `chattune merge` does) or
    a model directory (a merged or fully fine-tuned model). `dtype`: f16 | bf16 | q8_0 (2-D weights;
    norms and biases stay f32; a q8_0 row not a multiple of 32 long falls back to f16, as in llama.cpp).
    Raises ChattuneError / ModelError, with nothing written, for an existing output, an architecture
    other than llama / qwen2, a tokenizer llama.cpp would split differently, or an unreadable model.
    """
    from chattune.infer.load import load_source_tokenizer, read_model_source

    if dtype not in DTYPES:
        raise ChattuneError(f"dtype '{dtype}': use one of {', '.join(DTYPES)}")
    try:
        import gguf  # noqa: F401 - the format's own package writes the file
    except ImportError:
        raise ChattuneError("GGUF export needs the `gguf` package: pip install gguf") from None
    out = Path(output).expanduser()
    if out.suffix.lower() != ".gguf":
        raise ChattuneError(f"output '{out}' must end in .gguf")
    modelfile = out.with_name(out.stem + ".Modelfile")
    check_output_path(out, "--output", directory=False)
    for p in (out, modelfile):
        if p.exists():
            raise ChattuneError(f"'{p}' already exists; choose another --output or delete it first")

    src = read_model_source(model_path)
    arch = _read_architecture(src.base_dir)
    # Everything that can refuse the export is checked on the tokenizer, before the weights are loaded.
    tokenizer = load_source_tokenizer(src, for_generation=False)
    from chattune.render.template import (
        end_of_turn_token,
        set_template_kwargs,
        template_default_system,
        template_with_kwargs,
        template_with_system,
    )

    info = read_inference_info(src.path)
    kwargs = (info.template_kwargs if info is not None else None) or {}
    set_template_kwargs(tokenizer, kwargs)  # the end of turn and Ollama's template as training rendered

    eot = src.end_of_turn_token or end_of_turn_token(tokenizer)
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    if eot_id is None or eot_id == tokenizer.unk_token_id:
        raise ModelError(
            f"the end-of-turn token {eot!r} (inference.json) is not in the tokenizer's vocabulary"
        )
    pre = tokenizer_pre_name(tokenizer)
    system = src.system_prompt or None  # "" means the template's own default, as in chat and serve
    template = template_with_kwargs(template_with_system(tokenizer.chat_template, system), kwargs)
    go_template = ollama_template(tokenizer)

    model = _load_model(src)
    # The one rule for what ends an answer (adapter.stop_ids): the file's eos is the first, Ollama stops on all.
    stops = stop_ids(tokenizer, eot, getattr(model, "generation_config", None))
    modelfile_text = build_modelfile(
        out.name,
        go_template,
        stops=list(dict.fromkeys(tokenizer.convert_ids_to_tokens(stops))),
        system=system or template_default_system(tokenizer),
    )
    for stale in [*remove_stale_temporaries(out), *remove_stale_temporaries(modelfile)]:
        say(f"note: removed {stale}, left by an export to {out} that did not finish")
    with atomic_path(out, suffix=".tmp") as tmp, atomic_path(modelfile, suffix=".tmp") as tmp_modelfile:
        _write_gguf(
            tmp,
            model,
            tokenizer,
            arch=arch,
            dtype=dtype,
            pre=pre,
            eot_id=eot_id,
            template=template,
            name=src.name,
            label=out.name,
            extra={
                "chattune.base_model": src.base_model,
                "chattune.end_of_turn_token": eot,
                "chattune.stop_token_ids": ",".join(map(str, stops)),
                **({"chattune.system_prompt": system} if system else {}),
            },
        )
        tmp_modelfile.write_text(modelfile_text, encoding="utf-8")
    return out, modelfile


# -- what the file will say ---------------------------------------------------------------------------------
def _read_architecture(base_dir: Path) -> str:
    try:
        config = json.loads((Path(base_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {base_dir}/config.json: {e}") from None
    arch = config.get("model_type")
    if arch not in ARCHITECTURES:
        raise ModelError(
            f"GGUF export supports {' and '.join(ARCHITECTURES)} models; '{base_dir}' is '{arch}'. Merge it "
            "(chattune merge) and convert the merged directory with llama.cpp's convert_hf_to_gguf.py instead"
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":  # llama3 / yarn / linear need extra keys (and llama3 a rope_freqs tensor)
        raise ModelError(
            f"'{base_dir}' uses rope scaling '{rope_type}', which chattune's GGUF export does not write yet; "
            "convert the merged directory with llama.cpp's convert_hf_to_gguf.py instead"
        )
    if config.get("use_sliding_window"):
        raise ModelError(f"'{base_dir}' uses sliding-window attention, which llama.cpp's qwen2 does not run")
    return arch


def tokenizer_pre_name(tokenizer) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for how this byte-level BPE tokenizer splits text.

    Raises ModelError for a tokenizer llama.cpp would read differently: not byte-level BPE (SentencePiece
    vocabularies such as Llama-2's), or a pre-tokenizer with no llama.cpp counterpart here.
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre_tok = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if (
        model.get("type") != "BPE"
        or model.get("byte_fallback")
        or (spec.get("decoder") or {}).get("type") != ("ByteLevel")
    ):
        raise ModelError(
            "GGUF export writes byte-level BPE vocabularies (GPT-2 / Qwen / Llama-3 / SmolLM style); this "
            "tokenizer is not one (SentencePiece?). Convert a merged directory with llama.cpp's "
            "convert_hf_to_gguf.py instead"
        )
    steps = pre_tok.get("pretokenizers", [pre_tok]) if pre_tok.get("type") == "Sequence" else [pre_tok]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and steps[1].get("use_regex", True)
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        named = {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}.get(pattern)
        if named:
            return named
    raise ModelError(
        f"this tokenizer splits text with {json.dumps(pre_tok)[:200]}, which has no llama.cpp pre-tokenizer "
        "name known to chattune (gpt-2, smollm, qwen2, llama-bpe); llama.cpp would tokenize differently"
    )


def ollama_template(tokenizer) -> str | None:
    """Ollama's Go template for this chat template, or None when it is not ChatML (then Ollama picks
    one from the file's own template). ChatML is recognised by rendering a conversation with it, with the
    template arguments attached to the tokenizer (what the generation prompt adds after ChatML's is kept)."""
    from chattune.render.template import template_kwargs

    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "V"},
    ]
    want = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
    try:
        got = tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True, **template_kwargs(tokenizer)
        )
    except Exception:  # noqa: BLE001 - a template that cannot render this is not ChatML
        return None
    head = want + "<|im_start|>assistant\n"
    # Qwen3 with enable_thinking=False: ChatML whose generation prompt ends with an empty think block.
    extra = got[len(head) :] if got.startswith(head) else "{{"
    return None if "{{" in extra or '"""' in extra else OLLAMA_CHATML + extra


def build_modelfile(gguf_name: str, go_template: str | None, *, stops: list[str], system: str | None) -> str:
    """The Ollama Modelfile text: FROM ./gguf_name, TEMPLATE (when known), PARAMETER stop, SYSTEM."""
    for what, text in (("template", go_template), ("system prompt", system)):
        if text and '"""' in text:
            raise ChattuneError(f'the {what} contains """, which an Ollama Modelfile cannot quote')
    lines = [
        f"# Ollama: ollama create NAME -f {Path(gguf_name).stem}.Modelfile && ollama run NAME",
        f"FROM ./{gguf_name}",
    ]
    if go_template:
        lines.append(f'TEMPLATE """{go_template}"""')
    else:
        lines.append("# not a ChatML template: Ollama picks a template from the file's own chat template")
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


# -- the weights ----------------------------------------------------------------------------------------------
def _load_model(src):
    """The merged model (adapter) or the model directory itself, on the CPU in the checkpoint's dtype."""
    if src.adapter_dir is not None:
        from chattune.infer.merge import load_merged

        model, _ = load_merged(src)
        return model.eval()
    from chattune.infer.load import load_model_dir

    return load_model_dir(src, "auto").eval()


def llama_permute(w, n_head: int):
    """llama.cpp's row order for a llama Q or K projection (rows, ...) -> (rows, ...).

    HF checkpoints rotate the two halves of each head (rotate_half); llama.cpp's llama graph rotates
    adjacent pairs, so its converter interleaves each head's halves (convert_hf_to_gguf.py
    `LlamaModel.permute`); transformers' GGUF reader undoes exactly this. Qwen2 runs in NEOX mode: no permute.
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(model, arch: str) -> list[tuple[str, object, int | None]]:
    """(GGUF name, torch tensor in HF layout, heads to permute by or None) per tensor, in checkpoint order.

    A tied output matrix is not listed: llama.cpp (and transformers' reader) use token_embd for it.
    """
    import gguf

    cfg = getattr(model.config, "text_config", None) or model.config
    table = gguf.MODEL_ARCH.QWEN2 if arch == "qwen2" else gguf.MODEL_ARCH.LLAMA
    names = gguf.get_tensor_name_map(table, cfg.num_hidden_layers)
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = out_emb is not None and out_emb.weight is in_emb.weight
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    listed = []
    for hf_name, t in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(
                f"tensor '{hf_name}' has no llama.cpp name for '{arch}'; the file would be incomplete"
            )
        heads = None
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            heads = n_head
        elif arch == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            heads = n_kv
        listed.append((name, t, heads))
    return listed


def _to_array(t, heads: int | None):
    """float32 numpy copy of one tensor, rows permuted for llama.cpp when `heads` is given."""
    import torch

    arr = t.detach().to(torch.float32).cpu().numpy()
    return llama_permute(arr, heads) if heads else arr


def _tensor_type(shape: tuple[int, ...], dtype: str):
    """GGML type of one tensor: f32 for 1-D (norms, biases), else the asked type (q8_0 needs rows % 32 == 0)."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    if len(shape) == 1:
        return Q.F32
    want = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[dtype]
    block = GGML_QUANT_SIZES[want][0]
    return want if shape[-1] % block == 0 else Q.F16


# -- the file -------------------------------------------------------------------------------------------------
def _hparams(writer, model, arch: str) -> None:
    cfg = getattr(model.config, "text_config", None) or model.config
    rope = getattr(cfg, "rope_parameters", None) or {}
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads or cfg.num_attention_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(model.get_input_embeddings().weight.shape[0])


def _vocab(tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens by id (0..n_vocab-1) and their llama.cpp types, as convert_hf_to_gguf's `get_vocab_base`:
    special added tokens (and <|...|> ones) CONTROL, other added tokens USER_DEFINED, rows of the
    embedding with no token `[PADi]` UNUSED."""
    from gguf import TokenType

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= n_vocab:
        raise ModelError(
            f"the tokenizer has ids up to {max(by_id)} but the model embeds only {n_vocab} tokens"
        )
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(tok)
            looks_special = tok.startswith("<|") and tok.endswith("|>")
            types.append(TokenType.CONTROL if added[i].special or looks_special else TokenType.USER_DEFINED)
        else:
            tokens.append(tok)
            types.append(TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _write_tokenizer(writer, tokenizer, *, n_vocab: int, pre: str, eot_id: int, template: str) -> None:
    import gguf

    tokens, types = _vocab(tokenizer, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # Merges, bos/unk/pad ids and the add-bos flag as llama.cpp's own converter reads them (gguf.SpecialVocab
    # reads a tokenizer directory, so the in-memory tokenizer is saved to a scratch one first).
    with tempfile.TemporaryDirectory(prefix="chattune-tok-") as d:
        tokenizer.save_pretrained(d)
        special = gguf.SpecialVocab(d, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise ModelError("the tokenizer has no BPE merges to write")
    # The answer ends at the end-of-turn token the run trained: make it the file's eos, so llama.cpp and
    # Ollama stop there, not at a document-end token the model never learned to emit after an answer.
    special.special_token_ids["eos"] = eot_id
    special.special_token_ids.setdefault("pad", eot_id)
    ids = tokenizer("a")["input_ids"]
    special.add_special_token["bos"] = bool(ids) and ids[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = False
    special.chat_template = template
    special.add_to_gguf(writer, quiet=True)


def _write_gguf(
    path: Path, model, tokenizer, *, arch, dtype, pre, eot_id, template, name, label, extra
) -> None:
    """Header, metadata, tensor infos, then the tensors one at a time (converted as they are written, so
    memory holds the model plus one tensor, not a second copy of the model)."""
    import gguf
    import numpy as np

    say(f"writing {label}: {arch}, {dtype}")
    w = gguf.GGUFWriter(str(path), arch)
    try:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name)
        w.add_file_type(
            {
                "f16": gguf.LlamaFileType.MOSTLY_F16,
                "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            }[dtype]
        )
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _hparams(w, model, arch)
        n_vocab = model.get_input_embeddings().weight.shape[0]
        _write_tokenizer(w, tokenizer, n_vocab=n_vocab, pre=pre, eot_id=eot_id, template=template)
        for key, value in extra.items():
            w.add_string(key, value)
        tensors = _gguf_tensors(model, arch)
        types = [_tensor_type(tuple(t.shape), dtype) for _, t, _ in tensors]
        for (gname, t, _), qtype in zip(tensors, types, strict=True):
            nbytes = int(np.prod(gguf.quants.quant_shape_to_byte_shape(tuple(t.shape), qtype)))
            w.add_tensor_info(gname, tuple(t.shape), np.dtype(np.float32), nbytes, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for (_, t, heads), qtype in zip(tensors, types, strict=True):
            w.write_tensor_data(gguf.quants.quantize(_to_array(t, heads), qtype))
    finally:
        w.close()
