"""Open-answer VQA (VQAv2, TextVQA, GQA and files like them): the standard VQA accuracy with its normalisation.

Reads
- VQAv2's official files: the questions file (`v2_OpenEnded_mscoco_val2014_questions.json`) with its annotations
  beside it (`v2_mscoco_val2014_annotations.json`); images COCO_val2014_000000xxxxxx.jpg under the image root;
- TextVQA's `TextVQA_0.5.1_val.json` (`data`: question, image_id, ten `answers`); images IMAGE_ID.jpg;
- GQA's questions file (`testdev_balanced_questions.json`: id -> imageId, question, answer); images IMAGE_ID.jpg;
- records with `question`, `image` and `answers` (ten strings, or VQAv2's {answer, answer_id} objects) or one
  `answer` (lmms-lab's VQAv2 / textvqa / GQA parquet files, or the same fields in .jsonl).

Prompt (LLaVA-1.5): the question, then "Answer the question using a single word or phrase.".

Scoring, by what the file gives:
- VQAv2's answer objects: the official evaluation (vqaEval.py): the prediction is normalised (newlines and tabs to
  spaces, punctuation, then digits, articles and contractions); the references get the punctuation step only when
  they disagree, as vqaEval.py does; accuracy = the mean, over the ten sets of nine references left when one is
  taken out, of min(1, references equal to the prediction / 3);
- ten answer strings (TextVQA): as TextVQA's evaluator (m4c, which LLaVA uses): every answer, prediction and
  references, goes through EvalAI's answer normalisation (lower case, "," "?" removed, "'s" split off, then the
  same punctuation and digit/article steps), then the same leave-one-out average;
- one reference (GQA): 1 when the normalised prediction equals the normalised reference, else 0.
Reports accuracy, per answer type where the file has one (VQAv2: yes/no, number, other).
"""

from __future__ import annotations

import re
from pathlib import Path

from llava_kit.benchmarks.base import (
    LLAVA_SHORT_ANSWER,
    Benchmark,
    BenchmarkFileError,
    Item,
    Scores,
    json_safe,
    pick,
    ratio,
    read_json,
    read_rows,
    row_image,
)

LAYOUT = ("VQAv2 questions + annotations files, TextVQA's json, GQA's questions json, or records with `question`, "
          "`image` and `answers` (or one `answer`)")

# The VQA evaluation's tables (vqaEval.py; EvalAI's answer processor has the same ones).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
# vqaEval.py's pattern, typo included: `(?!<=\d)` is a lookahead, so every period not followed by a digit goes.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    """vqaEval.py's processPunctuation: a mark next to a space (or any mark in a text with a digit,digit comma) is
    removed, otherwise it becomes a space; then periods not followed by a digit are removed."""
    out = text
    for mark in PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    # vqaEval.py passes re.UNICODE (32) where `sub` takes its `count`: at most 32 periods are removed.
    return PERIOD_STRIP.sub("", out, 32)


def process_digit_article(text: str) -> str:
    """vqaEval.py's processDigitArticle: lower case, number words 0-10 to digits, articles dropped, contractions
    given their apostrophe."""
    words = [NUMBERS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_prediction(text: str) -> str:
    """A prediction as vqaEval.py normalises it."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def normalize_evalai(text: str) -> str:
    """An answer as EvalAI's answer processor normalises it (TextVQA's evaluator, LLaVA's VQAv2 submissions)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def leave_one_out_accuracy(prediction: str, references: list[str]) -> float:
    """The mean, over each reference left out in turn, of min(1, other references equal to `prediction` / 3)."""
    scores = []
    for i in range(len(references)):
        others = references[:i] + references[i + 1:]
        scores.append(min(1.0, sum(ref == prediction for ref in others) / 3))
    return sum(scores) / len(scores)


def vqav2_accuracy(prediction: str, references: list[str]) -> float:
    """VQA accuracy as vqaEval.py computes it for VQAv2's annotations."""
    references = [r.replace("\n", " ").replace("\t", " ").strip() for r in references]
    if len(set(references)) > 1:
        references = [process_punctuation(r) for r in references]
    return leave_one_out_accuracy(normalize_prediction(prediction), references)


def textvqa_accuracy(prediction: str, references: list[str]) -> float:
    """VQA accuracy as TextVQA's evaluator (m4c's TextVQAAccuracyEvaluator) computes it."""
    return leave_one_out_accuracy(normalize_evalai(prediction), [normalize_evalai(r) for r in references])


def exact_accuracy(prediction: str, reference: str) -> float:
    """1.0 when the normalised prediction equals the normalised reference (one-reference files such as GQA)."""
    return float(normalize_evalai(prediction) == normalize_evalai(reference))


RULES = {"vqav2": vqav2_accuracy, "textvqa": textvqa_accuracy,
         "exact": lambda prediction, references: exact_accuracy(prediction, references[0])}


# ------------------------------------------------------------------------------------------------ reading


def read(data: Path, image_root: Path | None, limit: int = 0) -> list[Item]:
    """VQA questions with their reference answers, from any of the layouts in the module docstring."""
    value = read_json(data) if data.suffix.lower() in (".json", ".jsonl") else read_rows(data)
    if isinstance(value, dict) and "questions" in value:
        rows = _vqav2_rows(value, data)
    elif isinstance(value, dict) and isinstance(value.get("data"), list):
        rows = [{**r, "image": f"{r['image_id']}.jpg"} if "image" not in r and "image_id" in r else r
                for r in value["data"]]
    elif isinstance(value, dict) and value and all(isinstance(v, dict) and "imageId" in v for v in value.values()):
        rows = [{"question_id": qid, **r, "image": f"{r['imageId']}.jpg"} for qid, r in value.items()]
    elif isinstance(value, list):
        rows = value
    else:
        raise BenchmarkFileError(f"{data}: not a VQA file; expected {LAYOUT}")
    items = []
    for n, row in enumerate(rows[:limit] if limit else rows, 1):
        where = f"{data.name}:{n}"
        pick(row, ("question",), where, LAYOUT)
        rule, references = _references(row, pick(row, ("answers", "answer"), where, LAYOUT), where)
        items.append(Item(id=str(row.get("question_id", n)), prompt=f"{str(row['question']).strip()}\n"
                          f"{LLAVA_SHORT_ANSWER}", images=[row_image(row.get("image"), image_root, where)],
                          answer={"rule": rule, "references": references},
                          category=str(row.get("answer_type") or ""), record=json_safe(row)))
    return items


def _references(row: dict, key: str, where: str) -> tuple[str, list[str]]:
    """(scoring rule, reference answers) of a row."""
    value = row[key]
    if key == "answer" or isinstance(value, str):
        return "exact", [str(value)]
    if not isinstance(value, list) or not value:
        raise BenchmarkFileError(f"{where}: `answers` must be a list of answers; expected {LAYOUT}")
    if all(isinstance(a, dict) and "answer" in a for a in value):
        return "vqav2", [str(a["answer"]) for a in value]
    if len(value) == 1:
        return "exact", [str(value[0])]
    return "textvqa", [str(a) for a in value]


def _vqav2_rows(questions: dict, data: Path) -> list[dict]:
    """VQAv2's questions joined with the annotations file beside them (the official names)."""
    name = data.name.replace("OpenEnded_", "").replace("questions", "annotations")
    annotations_path = data.with_name(name)
    if name == data.name or not annotations_path.is_file():
        raise BenchmarkFileError(f"{data} holds VQAv2 questions; their answers are in {name} beside it, which is "
                                 "missing (download both files of the split)")
    annotations = {a["question_id"]: a for a in read_json(annotations_path)["annotations"]}
    subtype = questions.get("data_subtype", "val2014")
    rows = []
    for q in questions["questions"]:
        a = annotations.get(q["question_id"])
        if a is None:
            raise BenchmarkFileError(f"question {q['question_id']} has no annotation in {annotations_path.name}")
        rows.append({**q, "answers": a["answers"], "answer_type": a.get("answer_type"),
                     "question_type": a.get("question_type"), "image": f"COCO_{subtype}_{int(q['image_id']):012d}.jpg"})
    return rows


def score(items: list[Item], predictions: list[str]) -> Scores:
    rows = []
    for item, prediction in zip(items, predictions, strict=True):
        rule = item.answer["rule"]
        rows.append({"rule": rule, "score": RULES[rule](prediction, item.answer["references"])})
    by_category, counts = {}, {"all": len(items)}
    for category in sorted({item.category for item in items if item.category}):
        chosen = [r["score"] for item, r in zip(items, rows, strict=True) if item.category == category]
        by_category[category] = {"accuracy": ratio(sum(chosen), len(chosen))}
        counts[category] = len(chosen)
    return Scores(rows, {"accuracy": ratio(sum(r["score"] for r in rows), len(rows))}, by_category, counts)


BENCHMARK = Benchmark(name="vqa", title="open-answer VQA (VQAv2, TextVQA, GQA): VQA accuracy", layouts=LAYOUT,
                      read=read, score=score, headline="accuracy")
