"""Label masks asserted token by token for every template, image expansion and safe truncation."""

import pytest

from llava_kit.data.encode import IGNORE_INDEX, EncodeError, encode_messages
from llava_kit.data.templates import IMAGE_TOKEN

QA = [{"role": "user", "content": "<image>\nWhat shape is in the image?"},
      {"role": "assistant", "content": "It is a circle."},
      {"role": "user", "content": "What color is the shape?"},
      {"role": "assistant", "content": "The shape is red."}]


def supervised_text(tokenizer, enc):
    return tokenizer.decode([t for t in enc.labels if t != IGNORE_INDEX])


def ignored_text(tokenizer, enc):
    return tokenizer.decode([t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab == IGNORE_INDEX])


def encode(tokenizer, messages, template, tokens_per_image=3, max_seq_len=512, n_images=1, **kw):
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return encode_messages(messages, tokenizer, template, image_id, tokens_per_image, max_seq_len,
                           n_images=n_images, **kw)


def test_labels_are_exactly_the_supervised_tokens(tiny_tokenizer):
    """Every token is either a copy of the input (supervised) or ignored; nothing else."""
    for template in ("plain", "vicuna_v1", "chatml", "tokenizer"):
        messages = QA[:2] if template == "plain" else QA
        enc = encode(tiny_tokenizer, messages, template)
        assert len(enc.input_ids) == len(enc.labels)
        assert all(lab in (IGNORE_INDEX, tok) for tok, lab in zip(enc.input_ids, enc.labels, strict=True))


def test_plain_supervises_caption_and_eos_only(tiny_tokenizer):
    enc = encode(tiny_tokenizer, QA[:2], "plain")
    assert tiny_tokenizer.decode(enc.input_ids) == "<s>" + IMAGE_TOKEN * 3 + "It is a circle.</s>"
    assert supervised_text(tiny_tokenizer, enc) == "It is a circle.</s>"
    # the instruction text is dropped entirely (LLaVA-1.5 plain)
    assert "What shape" not in tiny_tokenizer.decode(enc.input_ids)


def test_vicuna_v1_masks_system_and_user_turns(tiny_tokenizer):
    enc = encode(tiny_tokenizer, QA, "vicuna_v1")
    text = tiny_tokenizer.decode(enc.input_ids)
    assert text.startswith("<s>A chat between a curious user")
    assert " USER: <image><image><image>\nWhat shape is in the image? ASSISTANT: It is a circle.</s>USER: " in text
    assert supervised_text(tiny_tokenizer, enc) == " It is a circle.</s> The shape is red.</s>"
    ignored = ignored_text(tiny_tokenizer, enc)
    assert "USER:" in ignored and "ASSISTANT:" in ignored and "curious user" in ignored
    assert "circle" not in ignored and "red" not in ignored


def test_chatml_supervises_answers_and_end_of_turn(tiny_tokenizer):
    enc = encode(tiny_tokenizer, QA, "chatml", system_prompt="Be brief.")
    text = tiny_tokenizer.decode(enc.input_ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert supervised_text(tiny_tokenizer, enc) == "It is a circle.<|im_end|>The shape is red.<|im_end|>"
    assert "Be brief" in ignored_text(tiny_tokenizer, enc)


def test_tokenizer_own_template_matches_prefix_renders(tiny_tokenizer):
    enc = encode(tiny_tokenizer, QA, "tokenizer")
    expected = tiny_tokenizer.apply_chat_template(QA, tokenize=False)
    assert tiny_tokenizer.decode(enc.input_ids) == expected.replace(IMAGE_TOKEN, IMAGE_TOKEN * 3)
    assert supervised_text(tiny_tokenizer, enc) == "It is a circle.<|im_end|>The shape is red.<|im_end|>"


def test_generation_prompt_ends_where_the_answer_starts(tiny_tokenizer):
    enc = encode(tiny_tokenizer, QA[:1], "chatml", add_generation_prompt=True)
    assert tiny_tokenizer.decode(enc.input_ids).endswith("<|im_start|>assistant\n")
    enc = encode(tiny_tokenizer, QA[:1], "vicuna_v1", add_generation_prompt=True)
    assert tiny_tokenizer.decode(enc.input_ids).endswith(" ASSISTANT:")


def test_each_image_expands_to_the_projector_token_count(tiny_tokenizer):
    two = [{"role": "user", "content": "<image>\n<image>\nSame shape?"}, {"role": "assistant", "content": "Yes."}]
    image_id = tiny_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    enc = encode(tiny_tokenizer, two, "chatml", tokens_per_image=7, n_images=2)
    assert enc.input_ids.count(image_id) == 14 and enc.n_images == 2


def test_image_count_mismatch_is_refused(tiny_tokenizer):
    with pytest.raises(EncodeError, match="1 `<image>` tag"):
        encode(tiny_tokenizer, QA, "chatml", n_images=2)


def test_truncation_never_splits_an_image(tiny_tokenizer):
    image_id = tiny_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    messages = [{"role": "user", "content": "<image>\nWhat shape?"}, {"role": "assistant", "content": "A circle."},
                {"role": "user", "content": "<image>\nAnd this one?"}, {"role": "assistant", "content": "A star. " * 5}]
    full = encode(tiny_tokenizer, messages, "chatml", tokens_per_image=20, n_images=2)
    second_image_start = full.input_ids.index(image_id, full.input_ids.index(image_id) + 20)
    # a limit that falls in the middle of the second image's block
    enc = encode(tiny_tokenizer, messages, "chatml", tokens_per_image=20, n_images=2,
                 max_seq_len=second_image_start + 10)
    assert enc.truncated and enc.n_images == 1
    assert enc.input_ids.count(image_id) == 20  # the first image whole, the second dropped whole
    assert len(enc.input_ids) == second_image_start
    assert supervised_text(tiny_tokenizer, enc) == "A circle.<|im_end|>"


def test_over_long_sample_keeps_all_its_image_tokens(tiny_tokenizer):
    """An over-long answer is cut; the image tokens before it all stay."""
    image_id = tiny_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    messages = [{"role": "user", "content": "<image>\nDescribe the image."},
                {"role": "assistant", "content": "A red circle on a white background. " * 40}]
    enc = encode(tiny_tokenizer, messages, "chatml", tokens_per_image=64, max_seq_len=100)
    assert len(enc.input_ids) == 100 and enc.truncated
    assert enc.input_ids.count(image_id) == 64 and enc.n_images == 1


def test_fully_masked_sample_is_reported(tiny_tokenizer):
    messages = [{"role": "user", "content": "<image>\n" + "Describe the image. " * 10},
                {"role": "assistant", "content": "A circle."}]
    with pytest.raises(EncodeError, match="no supervised tokens left"):
        encode(tiny_tokenizer, messages, "chatml", tokens_per_image=40, max_seq_len=60)
