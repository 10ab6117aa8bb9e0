"""Each benchmark on a tiny file written in its public format: the prompts as LLaVA-1.5 asks them, answers read as
the reference scripts read them, and metrics checked against values computed by hand."""

from __future__ import annotations

import base64
import csv
import json
from pathlib import Path

import pytest

from llava_kit.benchmarks import BENCHMARKS, BenchmarkFileError, get_benchmark, mmbench, mme, pope, scienceqa, vqa
from llava_kit.config import BENCHMARK_NAMES
from llava_kit.errors import UsageError

IMAGES = Path(__file__).resolve().parents[2] / "assets" / "shapes_small" / "images" / "eval"
PNG = (IMAGES / "000000.png").read_bytes()
SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."


def test_the_registry_and_the_config_name_the_same_benchmarks():
    assert tuple(BENCHMARKS) == BENCHMARK_NAMES
    with pytest.raises(UsageError, match="unknown benchmark 'pop'; choose one of: custom, mmbench"):
        get_benchmark("pop")


# ---------------------------------------------------------------------------------------------- MMBench


def write_tsv(path: Path, rows: list[dict]) -> Path:
    columns = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns, delimiter="\t")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
    return path


def mmbench_rows():
    image = base64.b64encode(PNG).decode()
    return [{"index": 11, "question": "What colour is the shape?", "hint": "Look closely.", "A": "red", "B": "orange",
             "C": "green", "D": "blue", "answer": "B", "category": "attribute", "l2-category": "perception",
             "image": image},
            {"index": 12, "question": "Is it round?", "hint": "nan", "A": "yes", "B": "no", "C": "maybe",
             "D": "nan", "answer": "A", "category": "logic", "l2-category": "reasoning", "image": image}]


def test_mmbench_asks_every_rotation_with_llavas_prompt(tmp_path):
    items = mmbench.BENCHMARK.read(write_tsv(tmp_path / "mmbench_dev.tsv", mmbench_rows()), None)
    assert [i.id for i in items] == ["11", "1000011", "2000011", "3000011", "12", "1000012", "2000012"]
    first, second = items[0], items[1]
    assert first.prompt == ("Look closely.\nWhat colour is the shape?\nA. red\nB. orange\nC. green\nD. blue\n" + LETTER)
    assert first.answer == "B" and first.images == [PNG] and first.category == "attribute"
    # rotation 1: every option text one letter up, the right answer (orange) with them
    assert second.prompt.endswith("A. orange\nB. green\nC. blue\nD. red\n" + LETTER) and second.answer == "A"
    assert [i.answer for i in items[4:]] == ["A", "C", "B"]  # yes: A, then C (yes, no, maybe -> no, maybe, yes)
    assert items[4].prompt == "Is it round?\nA. yes\nB. no\nC. maybe\n" + LETTER  # no hint, no empty D
    assert first.messages() == [{"role": "user", "content": "<image>\n" + first.prompt}]


def test_mmbench_circular_accuracy_counts_a_question_right_only_when_every_rotation_is(tmp_path):
    items = mmbench.BENCHMARK.read(write_tsv(tmp_path / "mmbench_dev.tsv", mmbench_rows()), None)
    # question 11: right in all four rotations; question 12: right as given, wrong in its second rotation
    predictions = ["B", "A", "The answer is D.", "(C) orange", "A", "B", "B"]
    scores = mmbench.BENCHMARK.score(items, predictions)
    assert [r["parsed"] for r in scores.rows] == ["B", "A", "D", "C", "A", "B", "B"]
    assert [r["correct"] for r in scores.rows] == [True, True, True, True, True, False, True]
    assert scores.metrics == {"circular_accuracy": 0.5, "accuracy": 1.0}
    assert scores.by_category == {"attribute": {"circular_accuracy": 1.0, "accuracy": 1.0},
                                  "logic": {"circular_accuracy": 0.0, "accuracy": 1.0}}
    assert scores.counts == {"all": 2, "attribute": 1, "logic": 1}


def test_mmbench_reads_letters_as_vlmevalkit_does():
    options = {"A": "red", "B": "orange", "C": "green", "D": "blue"}
    assert mmbench.parse_answer("B", options) == "B"
    assert mmbench.parse_answer("(B)", options) == "B"
    assert mmbench.parse_answer("B. orange", options) == "B"
    assert mmbench.parse_answer("It is orange", options) == "B"  # no letter: the one option text it contains
    assert mmbench.parse_answer("A or B", options) is None  # two letters, no option text: none
    assert mmbench.parse_answer("red or blue", options) is None
    assert mmbench.parse_answer("", options) is None


def test_mmbench_takes_a_file_with_its_rotations_and_shared_images(tmp_path):
    """VLMEvalKit's circular TSV: rotation k of question i has index i + k * 1e6; an image is stored once."""
    rows = mmbench_rows()[:1]
    rows.append({**rows[0], "index": 1000011, "A": "orange", "B": "green", "C": "blue", "D": "red", "answer": "A",
                 "image": "11"})
    items = mmbench.BENCHMARK.read(write_tsv(tmp_path / "circular.tsv", rows), None)
    assert [i.id for i in items] == ["11", "1000011"] and items[1].images == [PNG]
    scores = mmbench.BENCHMARK.score(items, ["B", "B"])
    assert scores.metrics == {"circular_accuracy": 0.0, "accuracy": 1.0}


def test_mmbench_names_the_columns_it_expects(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("index\tquestion\tanswer\n1\tq\tA\n")
    with pytest.raises(BenchmarkFileError, match="no `A`, `B`, `image`; expected MMBench's TSV columns index, "
                                                 "question, hint, A, B, C, D, answer"):
        mmbench.BENCHMARK.read(path, None)


def test_mmbench_cn_asks_in_chinese(tmp_path):
    items = get_benchmark("mmbench-cn").read(write_tsv(tmp_path / "cn.tsv", mmbench_rows()), None, limit=1)
    assert len(items) == 4 and items[0].prompt.endswith("\n请直接回答选项字母。")


# ---------------------------------------------------------------------------------------------- MME


def write_mme_release(root: Path) -> Path:
    """The official release layout: existence/{images, questions_answers_YN}, code_reasoning/ side by side."""
    existence = root / "existence"
    (existence / "images").mkdir(parents=True)
    (existence / "questions_answers_YN").mkdir()
    for name, answers in (("000000000001", ("Yes", "No")), ("000000000002", ("Yes", "No"))):
        (existence / "images" / f"{name}.jpg").write_bytes(PNG)
        (existence / "questions_answers_YN" / f"{name}.txt").write_text(
            f"Is there a cat in this image? Please answer yes or no.\t{answers[0]}\n"
            f"Is there a dog in this image? Please answer yes or no.\t{answers[1]}\n")
    code = root / "code_reasoning"
    code.mkdir()
    (code / "0001.png").write_bytes(PNG)
    (code / "0001.txt").write_text("Does the code print 3? Please answer yes or no.\tYes\n"
                                   "Does the code print 4?  Please answer yes or no.\tNo\n")
    return root


def test_mme_reads_the_release_folder_with_llavas_prompt(tmp_path):
    items = mme.BENCHMARK.read(write_mme_release(tmp_path / "MME_Benchmark_release_version"), None)
    assert [(i.category, i.answer) for i in items] == [("code_reasoning", "yes"), ("code_reasoning", "no"),
                                                       ("existence", "yes"), ("existence", "no"),
                                                       ("existence", "yes"), ("existence", "no")]
    assert items[0].prompt == f"Does the code print 3?\n{SHORT}"
    assert items[1].prompt == f"Does the code print 4?\n{SHORT}"  # MME's double-space variant too
    assert items[2].record["pair"] == "existence/000000000001.jpg"


def test_mme_acc_acc_plus_and_scores(tmp_path):
    items = mme.BENCHMARK.read(write_mme_release(tmp_path / "MME"), None)
    # code_reasoning: both wrong; existence image 1: both right, image 2: one right
    predictions = ["No", "Yes", "Yes", "no.", "Yes, there is.", "I think so"]
    scores = mme.BENCHMARK.score(items, predictions)
    assert [r["parsed"] for r in scores.rows] == ["no", "yes", "yes", "no", "yes", "other"]
    assert scores.by_category["existence"] == {"acc": 0.75, "acc_plus": 0.5, "score": 125.0}
    assert scores.by_category["code_reasoning"] == {"acc": 0.0, "acc_plus": 0.0, "score": 0.0}
    assert scores.metrics == {"perception": 125.0, "cognition": 0.0, "total": 125.0, "acc": 0.5}
    assert scores.counts == {"all": 3, "code_reasoning": 1, "existence": 2}


def test_mme_reads_answers_as_its_eval_tool():
    assert [mme.parse_answer(a) for a in ("Yes", "no", "Yes.", "No, it is not", "Not really", "nope", "Maybe yes",
                                          "y")] == ["yes", "no", "yes", "no", "no", "no", "other", "other"]


def test_mme_records_are_paired_by_image_and_limited_by_image(tmp_path):
    rows = [{"question_id": f"count/{n}.png", "question": f"Are there {k} dogs? Please answer yes or no.",
             "answer": a, "category": "count", "image": f"{n}.png"}
            for n, k, a in ((1, 2, "Yes"), (1, 3, "No"), (2, 1, "No"), (2, 2, "Yes"))]
    (tmp_path / "mme.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for n in (1, 2):
        (tmp_path / f"{n}.png").write_bytes(PNG)
    items = mme.BENCHMARK.read(tmp_path / "mme.jsonl", tmp_path, limit=1)
    assert len(items) == 2 and {i.record["pair"] for i in items} == {"count/1.png"}
    scores = mme.BENCHMARK.score(mme.BENCHMARK.read(tmp_path / "mme.jsonl", tmp_path), ["yes", "no", "yes", "yes"])
    assert scores.by_category["count"] == {"acc": 0.75, "acc_plus": 0.5, "score": 125.0}
    assert scores.metrics["perception"] == 125.0


# ---------------------------------------------------------------------------------------------- POPE


def write_pope(path: Path, labels: list[str]) -> Path:
    """LLaVA's coco_pope_*.json: JSON Lines under a .json name."""
    lines = [{"question_id": n, "image": "000000.png", "text": f"Is there a thing {n} in the image?", "label": label}
             for n, label in enumerate(labels, 1)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_pope_precision_recall_f1_and_yes_ratio(tmp_path):
    path = write_pope(tmp_path / "coco_pope_random.json", ["yes", "yes", "no", "no", "yes", "no"])
    items = pope.BENCHMARK.read(path, IMAGES)
    assert items[0].prompt == f"Is there a thing 1 in the image?\n{SHORT}" and items[0].category == "random"
    predictions = ["Yes, there is.", "No.", "Yes", "There is not a thing.", "yes", "no"]
    scores = pope.BENCHMARK.score(items, predictions)
    assert [r["parsed"] for r in scores.rows] == ["yes", "no", "yes", "no", "yes", "no"]
    # TP 2, FN 1, FP 1, TN 2
    assert scores.metrics == pytest.approx({"accuracy": 4 / 6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3,
                                            "yes_ratio": 3 / 6})
    assert set(scores.by_category) == {"random"}


def test_pope_reads_answers_as_llavas_eval_pope():
    assert pope.parse_answer("No, there is no dog.") == "no"
    assert pope.parse_answer("There is not a dog") == "no"
    assert pope.parse_answer("Nothing is there. No.") == "yes"  # only the first sentence counts
    assert pope.parse_answer("I don't know") == "yes"
    assert pope.parse_answer("no") == "no" and pope.parse_answer("NO") == "yes"  # LLaVA's exact word test


def test_pope_folder_of_llava_files_gives_a_category_per_file(tmp_path):
    write_pope(tmp_path / "coco_pope_adversarial.json", ["yes", "no"])
    write_pope(tmp_path / "coco_pope_popular.json", ["no", "no"])
    items = pope.BENCHMARK.read(tmp_path, IMAGES)
    scores = pope.BENCHMARK.score(items, ["yes", "yes", "no", "no"])
    assert scores.by_category["adversarial"]["precision"] == 0.5 and scores.by_category["popular"]["accuracy"] == 1.0
    # no positive prediction and no positive label: precision, recall and F1 are 0, not a division by zero
    assert scores.by_category["popular"]["f1"] == 0.0
    assert scores.metrics["accuracy"] == 0.75 and scores.counts == {"all": 4, "adversarial": 2, "popular": 2}


def test_pope_refuses_an_answer_that_is_not_yes_or_no(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "Is there a dog?", "answer": "maybe", "image": "000000.png"}) + "\n")
    with pytest.raises(BenchmarkFileError, match="POPE answers are yes or no"):
        pope.BENCHMARK.read(path, IMAGES)
    path.write_text(json.dumps({"prompt": "Is there a dog?", "image": "000000.png"}) + "\n")
    with pytest.raises(BenchmarkFileError, match=r"no `question` or `text`; expected POPE records"):
        pope.BENCHMARK.read(path, IMAGES)


# ---------------------------------------------------------------------------------------------- ScienceQA


def write_scienceqa(root: Path) -> Path:
    problems = {
        "1": {"question": "Which is a mammal?", "choices": ["whale", "shark"], "answer": 0, "hint": "",
              "image": "image.png", "split": "test", "subject": "natural science"},
        "2": {"question": "Which word rhymes with cat?", "choices": ["hat", "dog", "sun"], "answer": 0, "hint": "",
              "image": None, "split": "test", "subject": "language science"},
        "3": {"question": "Which  state is highlighted?", "choices": ["Ohio", "Utah", "Iowa"], "answer": 2,
              "hint": "The map shows the states.", "image": "image.png", "split": "test",
              "subject": "social science"},
        "4": {"question": "Train only", "choices": ["a", "b"], "answer": 1, "hint": "", "image": "image.png",
              "split": "train", "subject": "natural science"},
    }
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps({"test": ["1", "2", "3"], "train": ["4"]}))
    for pid in ("1", "3"):
        (root / "images" / "test" / pid).mkdir(parents=True)
        (root / "images" / "test" / pid / "image.png").write_bytes(PNG)
    return root / "problems.json"


def test_scienceqa_img_keeps_problems_with_an_image_and_asks_the_cqm_prompt(tmp_path):
    items = scienceqa.BENCHMARK.read(write_scienceqa(tmp_path), tmp_path / "images" / "test")
    assert [i.id for i in items] == ["1", "3"]  # 2 has no image, 4 is not in the test split
    assert items[0].prompt == ("Context: N/A\nQuestion: Which is a mammal?\nOptions: (A) whale (B) shark\n" + LETTER)
    assert items[1].prompt == ("Context: The map shows the states.\nQuestion: Which state is highlighted?\n"
                               "Options: (A) Ohio (B) Utah (C) Iowa\n" + LETTER)  # LLaVA's double-space fix
    scores = scienceqa.BENCHMARK.score(items, ["A", "The answer is B."])
    assert scores.metrics == {"accuracy": 0.5}
    assert scores.by_category == {"natural science": {"accuracy": 1.0}, "social science": {"accuracy": 0.0}}


def test_scienceqa_reads_letters_as_llavas_eval_science_qa():
    assert scienceqa.parse_answer("B", 3) == "B"
    assert scienceqa.parse_answer("C. Iowa", 3) == "C"
    assert scienceqa.parse_answer("I think so. The answer is A.", 3) == "A"
    assert scienceqa.parse_answer("A cat", 3) is None
    assert scienceqa.parse_answer("D", 3) is None  # not among this problem's options
    assert scienceqa.parse_answer("The answer is A. The answer is B.", 3) is None  # two answers: failed


def test_scienceqa_reads_llavas_question_file(tmp_path):
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "image.png").write_bytes(PNG)
    records = [{"id": "1", "image": "1/image.png", "conversations": [
        {"from": "human", "value": "Context: N/A\nQuestion: Which is a mammal?\nOptions: (A) whale (B) shark\n<image>"},
        {"from": "gpt", "value": "The answer is A."}]},
        {"id": "2", "conversations": [{"from": "human", "value": "Question: no image"},
                                      {"from": "gpt", "value": "The answer is B."}]}]
    (tmp_path / "llava_test_CQM-A.json").write_text(json.dumps(records))
    items = scienceqa.BENCHMARK.read(tmp_path / "llava_test_CQM-A.json", tmp_path)
    assert len(items) == 1 and items[0].answer == "A" and items[0].record["n_choices"] == 2
    assert items[0].prompt == "Context: N/A\nQuestion: Which is a mammal?\nOptions: (A) whale (B) shark\n" + LETTER


# ---------------------------------------------------------------------------------------------- VQA


@pytest.mark.parametrize(("answer", "normalised"), [
    ("Two dogs.", "2 dogs"),           # number words to digits, the final period gone
    ("the red one", "red 1"),          # articles dropped
    ("dont know", "don't know"),       # contractions get their apostrophe
    ("1,000", "1000"),                 # a comma between digits goes, the digits stay together
    ("3.5", "3.5"),                    # a period before a digit stays
    ("red/blue", "red blue"),          # a mark inside a word becomes a space
    ("an apple / a pear", "apple pear"),  # a mark beside a space is removed
    ("Yes!", "yes"),
    ("  ten\tcats\n", "10 cats"),
])
def test_vqa_normalisation(answer, normalised):
    assert vqa.normalize_prediction(answer) == normalised


def test_evalai_normalisation_splits_possessives_and_drops_question_marks():
    assert vqa.normalize_evalai("Man's hat?") == "man 's hat"
    assert vqa.normalize_evalai("NOKIA.") == "nokia"


def test_vqa_accuracy_is_the_mean_over_the_ten_leave_one_out_subsets():
    others = ["3", "4", "5", "6", "7", "8", "9"]
    # three humans said 2: left out one of them, two remain (2/3); left out another answer, three remain (1)
    assert vqa.vqav2_accuracy("two", ["2"] * 3 + others) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)  # 0.9
    assert vqa.vqav2_accuracy("2", ["2"] * 2 + others + ["3"]) == pytest.approx((2 / 3 + 8 * 2 / 3) / 10)  # 0.6
    assert vqa.vqav2_accuracy("2", ["2"] + others + ["3", "3"]) == pytest.approx(9 * (1 / 3) / 10)  # 0.3
    assert vqa.vqav2_accuracy("2", ["2"] * 4 + others[:6]) == 1.0


def test_vqav2_normalises_references_only_when_they_disagree():
    """vqaEval.py's rule, kept exactly: ten identical references are compared as they are."""
    assert vqa.vqav2_accuracy("cat", ["cat."] * 4 + ["dog"] * 6) == 1.0
    assert vqa.vqav2_accuracy("cat", ["cat."] * 10) == 0.0
    assert vqa.textvqa_accuracy("cat", ["cat."] * 10) == 1.0  # TextVQA's evaluator normalises every answer
    assert vqa.textvqa_accuracy("NOKIA.", ["Nokia"] * 10) == 1.0


def test_vqa_reads_the_official_vqav2_pair_textvqa_gqa_and_records(tmp_path):
    image = "COCO_val2014_000000000042.jpg"
    (tmp_path / image).write_bytes(PNG)
    (tmp_path / "7.jpg").write_bytes(PNG)
    answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
               for i, a in enumerate(["2"] * 3 + ["3", "4", "5", "6", "7", "8", "9"])]
    (tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(
        {"data_subtype": "val2014", "questions": [{"image_id": 42, "question": "How many?", "question_id": 420}]}))
    (tmp_path / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": [
        {"question_id": 420, "image_id": 42, "answers": answers, "answer_type": "number", "question_type": "how many"}]}))
    [item] = vqa.BENCHMARK.read(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", tmp_path)
    assert item.prompt == f"How many?\n{SHORT}" and item.category == "number" and item.images == [tmp_path / image]
    scores = vqa.BENCHMARK.score([item], ["Two"])
    assert scores.metrics["accuracy"] == pytest.approx(0.9) and scores.rows[0]["rule"] == "vqav2"

    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": [
        {"question": "What brand?", "image_id": "7", "question_id": 1, "answers": ["Nokia"] * 9 + ["nokia phone"]}]}))
    [item] = vqa.BENCHMARK.read(tmp_path / "TextVQA_0.5.1_val.json", tmp_path)
    assert vqa.BENCHMARK.score([item], ["nokia"]).metrics["accuracy"] == 1.0

    (tmp_path / "testdev_balanced_questions.json").write_text(json.dumps(
        {"201": {"imageId": "7", "question": "What is on the table?", "answer": "cup"}}))
    [item] = vqa.BENCHMARK.read(tmp_path / "testdev_balanced_questions.json", tmp_path)
    scores = vqa.BENCHMARK.score([item], ["A cup."])
    assert item.id == "201" and scores.rows[0] == {"rule": "exact", "score": 1.0}


def test_vqav2_questions_without_their_annotations_are_refused(tmp_path):
    (tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": []}))
    with pytest.raises(BenchmarkFileError, match="v2_mscoco_val2014_annotations.json beside it, which is missing"):
        vqa.BENCHMARK.read(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", tmp_path)


def test_an_image_file_needs_an_image_root(tmp_path):
    path = write_pope(tmp_path / "coco_pope_random.json", ["yes"])
    with pytest.raises(BenchmarkFileError, match="give --image-root DIR"):
        pope.BENCHMARK.read(path, None)
    with pytest.raises(BenchmarkFileError, match="not found"):
        pope.BENCHMARK.read(path, tmp_path)


def test_lmms_lab_parquet_copies_are_read_with_their_image_bytes(tmp_path):
    """lmms-eval's Hugging Face copies: parquet files whose `image` column holds {bytes, path}."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    image = {"bytes": PNG, "path": "COCO_val2014_000000000042.jpg"}
    pope_rows = [{"question_id": "1", "question": "Is there a dog in the image?", "answer": "yes",
                  "category": "adversarial", "image": image},
                 {"question_id": "2", "question": "Is there a cat in the image?", "answer": "no",
                  "category": "adversarial", "image": image}]
    (tmp_path / "pope" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(pope_rows), tmp_path / "pope" / "data" / "test-00000-of-00001.parquet")
    items = pope.BENCHMARK.read(tmp_path / "pope" / "data", None)  # the folder of parquet files, no image root
    assert [i.images for i in items] == [[PNG], [PNG]] and items[0].category == "adversarial"
    assert "image" not in items[0].record  # the predictions file keeps no image bytes
    assert pope.BENCHMARK.score(items, ["Yes", "No"]).metrics["f1"] == 1.0

    mme_rows = [{"question_id": "code_reasoning/0020.png", "question": "Is this C++? Please answer yes or no.",
                 "answer": "Yes", "category": "code_reasoning", "image": image},
                {"question_id": "code_reasoning/0020.png", "question": "Is this Python? Please answer yes or no.",
                 "answer": "No", "category": "code_reasoning", "image": image}]
    pq.write_table(pa.Table.from_pylist(mme_rows), tmp_path / "mme.parquet")
    items = mme.BENCHMARK.read(tmp_path / "mme.parquet", None)
    assert items[0].prompt == f"Is this C++?\n{SHORT}"
    assert mme.BENCHMARK.score(items, ["yes", "no"]).metrics["cognition"] == 200.0
