"""Text data: packing keeps every token and separates documents; mixing weights; the token cache; bad input."""

import json
import multiprocessing
import time

import pytest
import torch

from llava_kit.config import DataConfig
from llava_kit.data.dataset import BadRecordError
from llava_kit.data.encode import IGNORE_INDEX
from llava_kit.data.packing import PackedCollator, pack_examples
from llava_kit.data.text import build_text_dataset
from llava_kit.data.token_cache import EncodedExamples, TokenCache


def chat_line(q, a):
    return json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"


def test_packing_loses_no_token_and_restarts_positions_per_document():
    eos = 2
    docs = [[1, 10 + i] + [5] * n + [eos] for i, n in enumerate([3, 0, 20, 7, 1])]  # one longer than a block
    blocks = pack_examples([(d, list(d)) for d in docs], block_size=8, split_documents=True)
    flat = [t for b in blocks for t in b.input_ids]
    assert flat == [t for d in docs for t in d]  # every token once, in order
    assert all(len(b) == 8 for b in blocks[:-1]) and 0 < len(blocks[-1]) <= 8
    # each document ends with EOS, so in the stream every document after the first follows an EOS
    starts = [i for i in range(1, len(flat)) if flat[i] == 1]
    assert all(flat[i - 1] == eos for i in starts)
    # positions count from 0 at each document start (and at each block start)
    for b in blocks:
        for i, (token, pos) in enumerate(zip(b.input_ids, b.position_ids, strict=True)):
            assert (pos == 0) == (i == 0 or token == 1)


def test_sft_packing_never_splits_a_conversation():
    examples = [([7] * n, [7] * n) for n in (5, 4, 3, 8, 1)]
    blocks = pack_examples(examples, block_size=8, split_documents=False)
    assert [len(b) for b in blocks] == [5, 7, 8, 1]
    with pytest.raises(ValueError, match="does not fit"):
        pack_examples([([1] * 9, [1] * 9)], block_size=8, split_documents=False)


def test_packed_documents_do_not_attend_to_each_other(tiny_dirs):
    """With restarting position_ids and no attention mask, a packed document's logits equal its logits alone."""
    from llava_kit.model.build import load_llm

    llm = load_llm(str(tiny_dirs["llm"])).eval()
    doc1, doc2 = [1, 40, 41, 42, 2], [1, 50, 51, 52, 53, 2]
    block = pack_examples([(doc1, doc1), (doc2, doc2)], block_size=16)[0]
    batch = PackedCollator(pad_token_id=0)([{k: torch.tensor(v) for k, v in vars(block).items()}])
    assert "attention_mask" not in batch and batch["use_cache"] is False
    with torch.no_grad():
        packed = llm(**batch).logits  # [1, 11, vocab]; the collator's batch as the Trainer passes it
        alone = llm(input_ids=torch.tensor([doc2])).logits  # [1, 6, vocab]
    torch.testing.assert_close(packed[0, len(doc1):], alone[0], atol=1e-5, rtol=1e-4)


def test_text_pt_packs_blocks_with_every_token(tiny_tokenizer, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"Document {i}: " + "the quick brown fox " * i for i in range(1, 12)))
    data = DataConfig(path=str(path), max_seq_len=32, packing=True, cache=False)
    dataset = build_text_dataset(data, "text-pt", tiny_tokenizer)
    lengths = [len(item["input_ids"]) for item in dataset.items]
    assert all(n == 32 for n in lengths[:-1])
    unpacked = build_text_dataset(DataConfig(path=str(path), max_seq_len=10**6, packing=False, cache=False),
                                  "text-pt", tiny_tokenizer)
    assert sum(lengths) == sum(len(i["input_ids"]) for i in unpacked.items)
    for item in dataset.items:  # text-pt: loss on every token, except a document's first (nothing predicts it)
        assert item["labels"] == [IGNORE_INDEX if p == 0 and t == tiny_tokenizer.bos_token_id else t
                                  for t, p in zip(item["input_ids"], item["position_ids"], strict=True)]
    assert dataset.report.kept == 11 and dataset.report.truncated == 0


def test_datasets_mix_with_weights(tiny_tokenizer, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.json"
    a.write_text("".join(chat_line(f"Question {i}?", f"Answer {i}.") for i in range(10)))
    b.write_text(json.dumps([{"instruction": f"Task {i}", "output": f"Done {i}."} for i in range(10)]))
    data = DataConfig(datasets=[{"path": str(a), "weight": 2.0}, {"path": str(b), "format": "alpaca", "weight": 0.5}],
                      template="chatml", max_seq_len=128, cache=False, packing=False)
    dataset = build_text_dataset(data, "text-sft", tiny_tokenizer, seed=3)
    assert len(dataset) == 25
    assert [(d["examples"], d["in_mixture"]) for d in dataset.report.datasets] == [(10, 20), (10, 5)]
    texts = [tiny_tokenizer.decode(item["input_ids"]) for item in dataset.items]
    assert sum("Task" in t for t in texts) == 5 and sum("Question" in t for t in texts) == 20


def test_bad_input_is_skipped_and_counted_or_stops_the_run(tiny_tokenizer, tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(chat_line("Who are you?", "I am Lumen.") + "{broken\n"
                    + json.dumps({"messages": [{"role": "wizard", "content": "x"}]}) + "\n"
                    + chat_line("Hi", "") + chat_line("Describe the image. " * 40, "Long.")
                    + chat_line("Name?", "Lumen."))
    data = DataConfig(path=str(path), template="chatml", max_seq_len=64, cache=False)
    dataset = build_text_dataset(data, "text-sft", tiny_tokenizer)
    report = dataset.report.to_dict()
    assert (report["total"], report["kept"], report["skipped"]) == (6, 2, 4)
    reasons = report["skipped_by_reason"]
    assert reasons["broken JSON line"] == 1 and reasons["empty answer"] == 1 and reasons["over-long"] == 1
    assert any("unknown role 'wizard'" in r["reason"] for r in report["skipped_records"])
    assert all(any(label != IGNORE_INDEX for label in item["labels"]) for item in dataset.items)

    data.bad_records = "error"
    with pytest.raises(BadRecordError, match=r"bad record sft.jsonl:2 .*broken JSON line.*data.bad_records=skip"):
        build_text_dataset(data, "text-sft", tiny_tokenizer)


def test_token_cache_hits_on_the_second_build_and_misses_when_data_changes(tiny_tokenizer, tmp_path, monkeypatch):
    import llava_kit.data.text as text

    path = tmp_path / "c.jsonl"
    path.write_text("".join(chat_line(f"Q{i}?", f"A{i}.") for i in range(5)))
    calls = []
    real = text._encode_sft
    monkeypatch.setattr(text, "_encode_sft", lambda *a: calls.append(1) or real(*a))
    data = DataConfig(path=str(path), template="chatml", max_seq_len=64, cache=True)
    first = build_text_dataset(data, "text-sft", tiny_tokenizer)
    second = build_text_dataset(data, "text-sft", tiny_tokenizer)
    assert len(calls) == 1 and second.report.datasets[0]["cache"] == "hit"
    assert [i["input_ids"] for i in first.items] == [i["input_ids"] for i in second.items]
    assert [i["labels"] for i in first.items] == [i["labels"] for i in second.items]
    data.system_prompt = "Another system prompt."  # part of the key: a miss
    build_text_dataset(data, "text-sft", tiny_tokenizer)
    path.write_text(path.read_text() + chat_line("Q5?", "A5."))  # new content: a miss
    assert len(build_text_dataset(data, "text-sft", tiny_tokenizer)) == 6 and len(calls) == 3


def _build_in_process(root, key, log):
    def build():
        with open(log, "a") as f:
            f.write("built\n")
        time.sleep(0.5)
        return EncodedExamples([[1, 2, 3]], [[1, 2, 3]], {"n": 1})

    encoded, _ = TokenCache(root).get_or_build(key, build)
    assert encoded.input_ids == [[1, 2, 3]]


def test_token_cache_builds_once_when_processes_start_together(tmp_path):
    ctx = multiprocessing.get_context("fork")
    log = tmp_path / "log"
    procs = [ctx.Process(target=_build_in_process, args=(tmp_path / "cache", "k", log)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert log.read_text() == "built\n"
