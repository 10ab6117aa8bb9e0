"""Preference tuning: the loss against hand-computed numbers, the pair readers, the stage's config checks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llava_kit.config import PREFERENCE_FORMATS, PreferenceConfig
from llava_kit.data.readers.preference import PREFERENCE_READERS, read_pair, read_pairs
from llava_kit.errors import ConfigError, RecordError
from llava_kit.train.preference import preference_loss
from tests.support import unchecked_config

# Two pairs. Summed answer log-probs of the policy and the reference, and the answers' token counts.
CHOSEN, REJECTED = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -2.0])
REF_CHOSEN, REF_REJECTED = torch.tensor([-2.0, -3.0]), torch.tensor([-2.0, -3.0])
N_CHOSEN, N_REJECTED = torch.tensor([2, 4]), torch.tensor([3, 2])


def loss_of(**settings):
    return preference_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, N_CHOSEN, N_REJECTED,
                           PreferenceConfig(**settings))


def test_dpo_sigmoid_loss_and_metrics_by_hand():
    loss, m = loss_of(beta=0.1)
    # pair 1: h = (-1 - -2) - (-3 - -2) = 1 + 1 = 2      -> -log sigmoid(0.2)  = 0.598139
    # pair 2: h = (-4 - -3) - (-2 - -3) = -1 - 1 = -2    -> -log sigmoid(-0.2) = 0.798139
    assert loss.item() == pytest.approx((0.598139 + 0.798139) / 2, abs=1e-5)
    # rewards: chosen 0.1 x (1, -1) -> mean 0; rejected 0.1 x (-1, 1) -> mean 0; margins (0.2, -0.2) -> 0
    assert m["rewards/chosen"].item() == pytest.approx(0.0, abs=1e-7)
    assert m["rewards/rejected"].item() == pytest.approx(0.0, abs=1e-7)
    assert m["rewards/margins"].item() == pytest.approx(0.0, abs=1e-7)
    assert m["rewards/accuracies"].item() == 0.5  # pair 1 right, pair 2 wrong
    assert m["logps/chosen"].item() == -2.5 and m["logps/rejected"].item() == -2.5


def test_the_sft_term_adds_the_chosen_answers_mean_nll():
    loss, _ = loss_of(beta=0.1, sft_weight=1.0)
    # mean NLL of the chosen answers: pair 1 -(-1) / 2 = 0.5, pair 2 -(-4) / 4 = 1.0 -> the mean rises by 0.75
    assert loss.item() == pytest.approx((0.598139 + 0.798139) / 2 + 0.75, abs=1e-5)


def test_label_smoothing_ipo_simpo_and_orpo_by_hand():
    smoothed, _ = loss_of(beta=0.1, label_smoothing=0.2)
    # pair 1: 0.8 x 0.598139 + 0.2 x 0.798139 = 0.638139; pair 2: 0.8 x 0.798139 + 0.2 x 0.598139 = 0.758139
    assert smoothed.item() == pytest.approx((0.638139 + 0.758139) / 2, abs=1e-5)

    ipo, m = loss_of(beta=0.5, loss_type="ipo")
    # mean per token: policy chosen (-0.5, -1), rejected (-1, -1); reference chosen (-1, -0.75), rejected
    # (-2/3, -1.5). h1 = 0.5 - (-1/3) = 0.833333, h2 = -0.25 - 0.5 = -0.75; target 1 / (2 x 0.5) = 1
    assert ipo.item() == pytest.approx(((0.833333 - 1) ** 2 + (-0.75 - 1) ** 2) / 2, abs=1e-5)
    assert m["rewards/chosen"].item() == pytest.approx(0.5 * (0.5 + -0.25) / 2, abs=1e-6)

    simpo, m = loss_of(beta=2.0, loss_type="simpo", simpo_gamma=0.5)
    # z = 2 x (mean chosen - mean rejected) - 0.5: pair 1 2 x 0.5 - 0.5 = 0.5, pair 2 2 x 0 - 0.5 = -0.5
    assert simpo.item() == pytest.approx((-math.log(1 / (1 + math.exp(-0.5))) - math.log(1 / (1 + math.exp(0.5))))
                                         / 2, abs=1e-5)
    assert m["rewards/chosen"].item() == pytest.approx(2.0 * (-0.5 - 1.0) / 2)  # beta x mean log-prob

    orpo, _ = loss_of(beta=0.1, loss_type="orpo")

    def log_odds(a):
        return a - math.log(1 - math.exp(a))

    expected = [-c - 0.1 * math.log(1 / (1 + math.exp(-(log_odds(c) - log_odds(r)))))
                for c, r in ((-0.5, -1.0), (-1.0, -1.0))]
    assert orpo.item() == pytest.approx(sum(expected) / 2, abs=1e-5)


def test_reference_free_losses_need_no_reference():
    loss, _ = preference_loss(CHOSEN, REJECTED, None, None, N_CHOSEN, N_REJECTED, PreferenceConfig(loss_type="simpo"))
    assert torch.isfinite(loss)


PAIRWISE = {"id": 1, "conversations": [{"from": "human", "value": "<image>\nDescribe it."}],
            "chosen": {"from": "gpt", "value": "A red square."}, "rejected": {"from": "gpt", "value": "A circle."},
            "images": ["a.png"], "system": "Be brief."}
ALPACA_PAIRWISE = {"instruction": "Say hi", "input": "politely", "chosen": "Hello.", "rejected": "Go away."}
RLAIF_V = {"image": "a.png", "question": "What is shown?", "chosen": "A square.", "rejected": "A square and a dog."}
TRL = {"images": ["a.png"], "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                          "text": "What?"}]}],
       "chosen": [{"role": "assistant", "content": "A square."}],
       "rejected": [{"role": "assistant", "content": "A cat."}]}
CAPTIONER = {"id": "3f2a-preference", "image": "a.png", "question": "Describe the image in detail.", "chosen": "A square.",
             "rejected": "A square and a cat.", "scores": [8, 3], "samples": ["A square.", "A square and a cat."],
             "judge_reason": "...", "sampler": "sft-merged", "task": "preference", "model": "gpt-4o", "sha256": "ab"}
"""What `llava-kit caption --task preference` writes (main's data_gen, docs/data_gen.md): read as it is."""
OPENAI = {"input": {"messages": [{"role": "user", "content": [
              {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "a.png"}}]}]},
          "preferred_output": [{"role": "assistant", "content": "A square."}],
          "non_preferred_output": [{"role": "assistant", "content": "Two squares."}]}


@pytest.mark.parametrize("record, fmt, prompt, chosen", [
    (PAIRWISE, "pairwise", [{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "<image>\nDescribe it."}], "A red square."),
    (ALPACA_PAIRWISE, "pairwise", [{"role": "user", "content": "Say hi\n\npolitely"}], "Hello."),
    (RLAIF_V, "rlaif-v", [{"role": "user", "content": "<image>\nWhat is shown?"}], "A square."),
    (TRL, "rlaif-v", [{"role": "user", "content": "<image>\nWhat?"}], "A square."),
    (CAPTIONER, "rlaif-v", [{"role": "user", "content": "<image>\nDescribe the image in detail."}], "A square."),
    (OPENAI, "openai-preference", [{"role": "user", "content": "What is this?\n<image>"}], "A square."),
])
def test_each_preference_format_reads_into_one_pair(record, fmt, prompt, chosen):
    stage = "text-dpo" if record is ALPACA_PAIRWISE else "dpo"
    for given in ("auto", fmt):
        pair, used = read_pair(record, "f.json[0]", given, stage)
        assert used == fmt
        assert pair.prompt == prompt and pair.chosen["content"] == chosen
        assert pair.chosen["role"] == pair.rejected["role"] == "assistant"
        assert pair.images == ([] if record is ALPACA_PAIRWISE else ["a.png"])


@pytest.mark.parametrize("record, stage, kind", [
    ({**RLAIF_V, "rejected": RLAIF_V["chosen"]}, "dpo", "chosen equals rejected"),
    ({k: v for k, v in OPENAI.items() if k != "non_preferred_output"}, "dpo", "missing rejected answer"),
    ({**RLAIF_V, "rejected": ""}, "dpo", "empty answer"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ho"}]}, "dpo",
     "not a preference pair"),
    (RLAIF_V, "text-dpo", "images in a text stage"),
    ({**RLAIF_V, "image": {"bytes": "..."}}, "dpo", "image data instead of a path"),
    ({**PAIRWISE, "conversations": [{"from": "human", "value": "Describe it."}]}, "dpo",
     "`<image>` tags do not match the images"),
    ({**PAIRWISE, "videos": ["v.mp4"]}, "dpo", "video not supported"),
])
def test_bad_pairs_are_refused_with_a_stable_reason(record, stage, kind):
    with pytest.raises(RecordError) as err:
        read_pair(record, "f.json[0]", "auto", stage)
    assert err.value.kind == kind


def test_a_conversation_under_dpo_names_what_it_is_and_the_formats():
    with pytest.raises(RecordError, match="sharegpt data .* stage sft .* pairwise"):
        read_pair({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ho"}]}, "x", "auto",
                  "dpo")


def test_files_and_llama_factory_ranking_entries_are_read_and_counted(tmp_path):
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in (RLAIF_V, OPENAI, {"x": 1})) + "\n{bad")
    result = read_pairs(str(tmp_path / "pairs.jsonl"), "auto", "dpo")
    assert len(result.pairs) == 2 and result.formats["pairs.jsonl"] == {"rlaif-v": 1, "openai-preference": 1}
    assert sorted(b.kind for b in result.bad) == ["broken JSON line", "not a preference pair"]

    (tmp_path / "dpo.json").write_text(json.dumps([PAIRWISE]))
    (tmp_path / "sft.json").write_text(json.dumps([{"conversations": PAIRWISE["conversations"]}]))
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "dpo_demo": {"file_name": "dpo.json", "formatting": "sharegpt", "ranking": True,
                     "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected",
                                 "images": "images"}},
        "sft_demo": {"file_name": "sft.json", "formatting": "sharegpt"}}))
    result = read_pairs(f"{tmp_path}/dataset_info.json#dpo_demo", "auto", "dpo")
    assert len(result.pairs) == 1 and result.pairs[0].images == ["a.png"]
    with pytest.raises(ValueError, match="not preference data"):
        read_pairs(f"{tmp_path}/dataset_info.json#sft_demo", "auto", "dpo")


def test_the_registry_and_the_format_names_agree():
    assert set(PREFERENCE_READERS) == set(PREFERENCE_FORMATS)


def _cfg(stage="dpo", **keys):
    return unchecked_config(stage, **keys)


def test_dpo_defaults_lora_on_the_llm_and_a_frozen_projector():
    t = _cfg().model.trainable
    assert (t.vision, t.projector, t.llm) == ("frozen", "frozen", "lora")
    assert _cfg("text-dpo").modality == "text"


@pytest.mark.parametrize("stage, sections, message", [
    ("dpo", {"data__packing": True}, "data.packing` is not supported by stage `dpo`"),
    ("dpo", {"model__trainable__vision": "full"}, "keeps the vision tower frozen"),
    ("dpo", {"data__template": "plain"}, "needs a chat template"),
    ("dpo", {"train__preference__loss_type": "ipo", "train__preference__label_smoothing": 0.1}, "ipo has none"),
    ("dpo", {"train__preference__beta": 0}, "beta` must be > 0"),
    ("dpo", {"train__preference__label_smoothing": 0.5}, "must be in [0, 0.5)"),
    ("sft", {"train__preference__beta": 0.2}, "stage `sft` does not use it"),
    ("dpo", {"train__preference__loss_type": "orpo", "train__preference__sft_weight": 1.0}, "0 with loss_type orpo"),
    ("dpo", {"data__format": "sharegpt"}, "is not read by stage `dpo`"),
])
def test_preference_settings_are_checked_up_front(stage, sections, message):
    with pytest.raises(ConfigError) as err:
        _cfg(stage, **sections)
    assert message in str(err.value)
