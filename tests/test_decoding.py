"""decoding.greedy_decode: the static-cache decoder picks the tokens `generate` picks.

On the CPU the step runs eagerly (`cuda_graph=False`); the CUDA graph replays that same step, and was
checked against `generate` on an H200 (bench/RESULTS.md, issue 14).
"""

from __future__ import annotations

import pytest
import torch

from chattune.infer.graph_decode import can_decode_static, greedy_decode


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def model_and_batch(tiny_model_dir, qwen_tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    texts = [
        "你好",
        "a much longer prompt, so that the other rows are left-padded by several tokens",
        "2+2=?",
    ]
    enc = qwen_tokenizer(
        texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    )
    assert (enc["attention_mask"] == 0).any()  # the batch is left-padded
    return model, enc


def _generate(model, enc, stop: int, pad: int, n: int) -> torch.Tensor:
    with torch.inference_mode():
        out = model.generate(
            **enc, max_new_tokens=n, do_sample=False, eos_token_id=[stop], pad_token_id=pad, top_k=None
        )
    return out[:, enc["input_ids"].shape[1] :]


def test_static_greedy_decoding_picks_the_tokens_of_generate(model_and_batch, qwen_tokenizer):
    model, enc = model_and_batch
    pad = qwen_tokenizer.pad_token_id
    assert can_decode_static(model)
    free = _generate(model, enc, stop=pad, pad=pad, n=24)  # a stop id the model does not produce here
    mine = greedy_decode(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=24, stop_ids=[pad],
                         pad_id=pad, cuda_graph=False)  # fmt: skip
    assert torch.equal(mine, free)
    # Rows that stop: the token row 0 produced 5th becomes the stop id; rows end there, then hold the pad id.
    stop = int(free[0, 4])
    ref = _generate(model, enc, stop=stop, pad=pad, n=24)
    mine = greedy_decode(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=24, stop_ids=[stop],
                         pad_id=pad, cuda_graph=False)  # fmt: skip
    assert (ref == pad).any()  # something stopped early
    width = ref.shape[1]  # generate ends when every row has stopped; greedy_decode checks every 16 steps
    assert torch.equal(mine[:, :width], ref) and bool((mine[:, width:] == pad).all())


def test_models_without_sdpa_are_left_to_generate(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    assert not can_decode_static(eager)


def test_rows_that_stop_at_once_end_decoding_at_once(model_and_batch, qwen_tokenizer):
    model, enc = model_and_batch
    pad = qwen_tokenizer.pad_token_id
    first = _generate(model, enc, stop=pad, pad=pad, n=1)[:, 0].tolist()
    mine = greedy_decode(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=24, stop_ids=first,
                         pad_id=pad, cuda_graph=False)  # fmt: skip
    assert mine.tolist() == [[t] for t in first]


@pytest.mark.parametrize(
    "setting",
    [dict(no_repeat_ngram_size=3), dict(min_new_tokens=4), dict(num_beams=2), dict(suppress_tokens=[5]),
     dict(forced_bos_token_id=0)],
)  # fmt: skip
def test_models_whose_generation_config_changes_greedy_picks_are_left_to_generate(tiny_model_dir, setting):
    # generate fills the fields chattune leaves unset from generation_config.json; greedy_decode applies
    # only the repetition penalty (below), so under these its tokens would differ.
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    assert can_decode_static(model)
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=0.7, top_p=0.8, top_k=20, **setting
    )
    assert not can_decode_static(model)


@pytest.mark.parametrize("penalty", [1.05, 1.5])
def test_the_repetition_penalty_of_generation_config_is_applied_as_generate_applies_it(
    model_and_batch, qwen_tokenizer, penalty
):
    """Qwen2.5-Instruct's generation_config.json sets repetition_penalty 1.05, and `generate` applies it
    to greedy answers too; a strong penalty changes this model's picks, and both decoders agree."""
    from transformers import GenerationConfig

    model, enc = model_and_batch
    pad = qwen_tokenizer.pad_token_id
    plain = _generate(model, enc, stop=pad, pad=pad, n=24)
    base = model.get_base_model()  # whose generation_config peft's generate reads
    saved = base.generation_config
    base.generation_config = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=20,
                                              repetition_penalty=penalty)  # fmt: skip
    try:
        assert can_decode_static(model)
        ref = _generate(model, enc, stop=pad, pad=pad, n=24)
    finally:
        base.generation_config = saved
    mine = greedy_decode(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=24, stop_ids=[pad],
                         pad_id=pad, cuda_graph=False, repetition_penalty=penalty)  # fmt: skip
    if penalty == 1.5:
        assert not torch.equal(ref, plain)  # the penalty changed what greedy picks
    assert torch.equal(mine, ref)
