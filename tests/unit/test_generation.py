"""llava-kit's decoding loop (model/generation.py) against transformers' generate, on tiny random models."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from llava_kit.config import ModelConfig
from llava_kit.data.encode import encode_messages
from llava_kit.inference import ChatSession, SamplingParams
from llava_kit.inference.service import _CallbackStreamer
from llava_kit.model.build import build_llava
from llava_kit.model.generation import generate
from llava_kit.store.specs import InferenceSettings

NEW = 16
VOCAB = 300  # the text-only models' vocabulary (random prompts, no tokenizer)
TEXT_FAMILIES = {  # model type: config overrides; sliding windows shorter than the prompt, so that they matter
    "llama": {},
    "qwen2": {},
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 2, "n_positions": 256},
    "mistral": {"sliding_window": 6},
    "gemma2": {"head_dim": 16, "sliding_window": 6},  # alternating sliding/global layers, logit soft-capping
    "lfm2": {"layer_types": ["conv", "full_attention"]},  # a hybrid cache: convolution states + KV
}


def spread_weights(module: torch.nn.Module, seed: int = 0) -> None:
    """Wider random weights than the 0.02 init: varied greedy answers with clear margins between tokens."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def text_lm(family: str):
    extra = TEXT_FAMILIES[family]
    base = {} if family == "gpt2" else {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                        "num_attention_heads": 2, "num_key_value_heads": 2,
                                        "max_position_embeddings": 256}
    config = AutoConfig.for_model(family, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                  **base, **extra)
    lm = AutoModelForCausalLM.from_config(config).eval()
    spread_weights(lm)
    return lm


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [batch, width], as answer_batch and the server worker build them."""
    width = max(map(len, rows))
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return input_ids, attention_mask


def text_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in (12, 8, 10)]
    return left_padded(rows, pad=0)


@pytest.fixture(scope="module")
def llava(tiny_dirs):
    cfg = ModelConfig()
    cfg.vision.name_or_path = str(tiny_dirs["vision"])
    cfg.llm.name_or_path = str(tiny_dirs["llm"])
    model, tokenizer = build_llava(cfg)
    spread_weights(model.language_model)
    return model.eval(), tokenizer


def llava_batch(model, tokenizer, questions: list[tuple[bool, str]]):
    """input_ids, attention_mask and pixel_values of chat prompts `(with_image, text)`, left-padded."""
    rows = []
    for with_image, text in questions:
        content = f"<image>\n{text}" if with_image else text
        rows.append(encode_messages([{"role": "user", "content": content}], tokenizer, "chatml", model.image_token_id,
                                    model.tokens_per_image, max_seq_len=10**9, n_images=int(with_image),
                                    add_generation_prompt=True).input_ids)
    input_ids, attention_mask = left_padded(rows, tokenizer.pad_token_id)
    n_images = sum(with_image for with_image, _ in questions)
    pixel_values = torch.randn(n_images, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    return input_ids, attention_mask, pixel_values


def hf_llava(model, input_ids, attention_mask, pixel_values, **kwargs) -> torch.Tensor:
    """transformers' generate on the same prompt embeddings (what LlavaModel.generate called before)."""
    with torch.no_grad():
        return model.language_model.generate(inputs_embeds=model.embed(input_ids, pixel_values),
                                             attention_mask=attention_mask, **kwargs)


def test_llava_greedy_with_an_image_equals_transformers_generate(llava):
    model, tokenizer = llava
    input_ids, attention_mask, pixel_values = llava_batch(model, tokenizer, [(True, "What shape is in the image?")])
    kwargs = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    ours = model.generate(input_ids, pixel_values=pixel_values, attention_mask=attention_mask, **kwargs)
    assert ours.tolist() == hf_llava(model, input_ids, attention_mask, pixel_values, **kwargs).tolist()
    assert len(set(ours[0].tolist())) >= 2  # not a constant answer: the equality means something
    other = model.generate(input_ids, pixel_values=pixel_values + 1.0, attention_mask=attention_mask, **kwargs)
    assert not torch.equal(ours, other)  # the image reaches the answer


def test_llava_left_padded_batch_equals_transformers_generate(llava):
    model, tokenizer = llava
    questions = [(True, "Describe the image."), (False, "Who are you?"), (True, "What color is the shape on it?")]
    input_ids, attention_mask, pixel_values = llava_batch(model, tokenizer, questions)
    assert len(set(attention_mask.sum(1).tolist())) == 3  # three lengths: real left padding
    kwargs = {"max_new_tokens": NEW, "min_new_tokens": NEW, "pad_token_id": tokenizer.pad_token_id}
    ours = model.generate(input_ids, pixel_values=pixel_values, attention_mask=attention_mask, **kwargs)
    assert ours.shape == (3, NEW)
    assert ours.tolist() == hf_llava(model, input_ids, attention_mask, pixel_values, **kwargs).tolist()
    assert all(len(set(row)) >= 2 for row in ours.tolist())


@pytest.mark.parametrize("family", sorted(TEXT_FAMILIES))
def test_text_lm_greedy_equals_transformers_generate(family):
    lm = text_lm(family)
    input_ids, attention_mask = text_batch()
    ours = generate(lm, input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=10, min_new_tokens=10)
    with torch.no_grad():
        theirs = lm.generate(input_ids, attention_mask=attention_mask, max_new_tokens=10, min_new_tokens=10,
                             do_sample=False)
    assert ours.tolist() == theirs[:, input_ids.shape[1]:].tolist()
    assert len(set(ours.flatten().tolist())) >= 2


def test_stop_tokens_end_rows_and_the_rest_is_pad(llava):
    model, tokenizer = llava
    pad = tokenizer.pad_token_id
    questions = [(True, "Describe the image."), (False, "Who are you?"), (True, "What color is the shape on it?")]
    input_ids, attention_mask, pixel_values = llava_batch(model, tokenizer, questions)
    free = model.generate(input_ids, pixel_values=pixel_values, attention_mask=attention_mask, max_new_tokens=NEW,
                          min_new_tokens=NEW, pad_token_id=pad).tolist()
    # every row's third token is a stop token: each row stops by then, some earlier where a stop comes first
    stops = sorted({row[2] for row in free} - {pad})
    out = model.generate(input_ids, pixel_values=pixel_values, attention_mask=attention_mask, max_new_tokens=NEW,
                         eos_token_id=stops, pad_token_id=pad)
    ends = [next(i for i, token in enumerate(row) if token in stops) + 1 for row in free]
    assert out.shape[1] == max(ends) <= 3  # decoding ends when every row has stopped
    for row, full, end in zip(out.tolist(), free, ends, strict=True):
        assert row == full[:end] + [pad] * (out.shape[1] - end)
    theirs = hf_llava(model, input_ids, attention_mask, pixel_values, max_new_tokens=NEW, eos_token_id=stops,
                      pad_token_id=pad, do_sample=False)
    assert out.tolist() == theirs.tolist()

    # one stop token, early in the first row: that row pads while the others go on
    stop = free[0][1]
    out = model.generate(input_ids, pixel_values=pixel_values, attention_mask=attention_mask, max_new_tokens=NEW,
                         eos_token_id=stop, pad_token_id=pad)
    ends = [next((i + 1 for i, token in enumerate(row) if token == stop), NEW) for row in free]
    assert ends[0] <= 2 < out.shape[1] == max(ends)
    for row, full, end in zip(out.tolist(), free, ends, strict=True):
        assert row == full[:end] + [pad] * (out.shape[1] - end)

    # min_new_tokens holds the stop tokens back, as in generate
    held = model.generate(input_ids, pixel_values=pixel_values, attention_mask=attention_mask, max_new_tokens=NEW,
                          min_new_tokens=5, eos_token_id=stops, pad_token_id=pad)
    assert held.shape[1] >= 5 and not set(held[:, :5].flatten().tolist()) & set(stops)
    assert held.tolist() == hf_llava(model, input_ids, attention_mask, pixel_values, max_new_tokens=NEW,
                                     min_new_tokens=5, eos_token_id=stops, pad_token_id=pad,
                                     do_sample=False).tolist()


def test_max_new_tokens_is_respected():
    lm = text_lm("llama")
    input_ids, attention_mask = text_batch()
    long = generate(lm, input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=12, min_new_tokens=12)
    short = generate(lm, input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=5, min_new_tokens=5)
    assert long.shape == (3, 12) and short.shape == (3, 5)
    assert short.tolist() == long[:, :5].tolist()  # greedy: a shorter budget is a prefix of the longer one
    one = generate(lm, input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=1)
    assert one.tolist() == long[:, :1].tolist()
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(lm, input_ids=input_ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="exactly one"):
        generate(lm, max_new_tokens=3)


def test_streamed_text_is_the_answer_and_what_generate_streams(llava):
    model, tokenizer = llava
    session = ChatSession(model, tokenizer, InferenceSettings("chatml", None, "pad", 2048),
                          SamplingParams(max_new_tokens=NEW))
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    session.pending_image = image
    pieces: list[str] = []
    answer = session.ask("What shape is in the image?", on_text=pieces.append)
    assert len(pieces) >= 2 and "".join(pieces).strip() == answer

    # transformers' generate on the same prompt streams the same pieces
    session.messages.pop()  # the answer: the prompt ends where the answer started
    prompt = torch.tensor([session._prompt_ids()])
    theirs: list[str] = []
    hf_llava(model, prompt, torch.ones_like(prompt), image, max_new_tokens=NEW, do_sample=False,
             eos_token_id=session.stop_token_ids(), pad_token_id=tokenizer.pad_token_id,
             streamer=_CallbackStreamer(tokenizer, theirs.append))
    assert theirs == pieces


def test_sampling_is_seeded_differs_from_greedy_and_equals_generate_under_the_seed():
    lm = text_lm("llama")
    input_ids, attention_mask = text_batch()
    sampling = {"do_sample": True, "temperature": 1.5, "top_p": 0.9, "max_new_tokens": 10, "min_new_tokens": 10}
    torch.manual_seed(0)
    first = generate(lm, input_ids=input_ids, attention_mask=attention_mask, **sampling)
    torch.manual_seed(0)
    again = generate(lm, input_ids=input_ids, attention_mask=attention_mask, **sampling)
    greedy = generate(lm, input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=10, min_new_tokens=10)
    assert torch.equal(first, again)
    assert not torch.equal(first, greedy)
    torch.manual_seed(0)
    with torch.no_grad():
        theirs = lm.generate(input_ids, attention_mask=attention_mask, **sampling)[:, input_ids.shape[1]:]
    assert first.tolist() == theirs.tolist()  # same warpers in the same order, same draws
    nucleus_of_one = generate(lm, input_ids=input_ids, attention_mask=attention_mask, **{**sampling, "top_p": 1e-9})
    assert torch.equal(nucleus_of_one, greedy)  # the most likely token always stays


def test_a_lora_wrapped_llm_decodes_with_its_adapter():
    from peft import LoraConfig, get_peft_model

    lm = get_peft_model(text_lm("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False))  # random B: the adapter matters
    input_ids, attention_mask = text_batch()
    ours = generate(lm, input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=10, min_new_tokens=10)
    with torch.no_grad():
        theirs = lm.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=10,
                             min_new_tokens=10, do_sample=False)
    assert ours.tolist() == theirs[:, input_ids.shape[1]:].tolist()
    with lm.disable_adapter():
        base = generate(lm, input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=10, min_new_tokens=10)
    assert not torch.equal(ours, base)


def test_what_the_loop_does_not_implement_goes_to_generate(caplog):
    lm = text_lm("llama")
    lm.generation_config.repetition_penalty = 1.7
    input_ids, attention_mask = text_batch()
    with caplog.at_level(logging.WARNING, logger="llava_kit.model.generation"):
        ours = generate(lm, input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=8, min_new_tokens=8)
    assert "repetition_penalty=1.7" in caplog.text
    with torch.no_grad():
        theirs = lm.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8, min_new_tokens=8,
                             do_sample=False)
    assert ours.tolist() == theirs[:, input_ids.shape[1]:].tolist()
    plain = copy.deepcopy(lm)
    plain.generation_config.repetition_penalty = 1.0
    assert not torch.equal(ours, generate(plain, input_ids=input_ids, attention_mask=attention_mask,
                                          max_new_tokens=8, min_new_tokens=8))  # the penalty was applied
    beams = generate(plain, input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=4, num_beams=2)
    assert beams.shape[0] == 3 and beams.shape[1] <= 4  # an argument the loop lacks: generate's beam search
