"""Data from one format to another, through the canonical sample: `llava-kit data convert`.

    llava-kit data convert mllm_demo.json -o mllm_llava.json --to llava
    llava-kit data convert train.jsonl -o lf/train.json --to sharegpt --dataset-info   # + a LLaMA-Factory entry

Any format the readers take goes in (LLaMA-Factory entries too); `--to` writes LLaVA JSON, LLaMA-Factory's
ShareGPT or OpenAI messages (config.WRITABLE_FORMATS), `.json` as one array, `.jsonl` one record per line. A record
the readers refuse, or that the target cannot express (tool calls in LLaVA JSON, an answer with weight 0 in
ShareGPT), is left out with its reason, like `data check` reports it. Image paths are written as they were read
(relative to the same image root).
"""

from __future__ import annotations

import json
from pathlib import Path

from llava_kit.config import WRITABLE_FORMATS
from llava_kit.data.readers import READERS, BadRecord, ReadResult, read_data
from llava_kit.data.readers.dataset_info import INFO_FILE, write_entry
from llava_kit.data.readers.sample import bad_record
from llava_kit.errors import UsageError


def convert(paths: str | list[str], out: str | Path, to: str, fmt: str = "auto",
            dataset_info: bool = False) -> tuple[int, list[BadRecord], ReadResult]:
    """Read `paths`, write the samples to `out` in format `to`; returns (records written, records left out with
    their reasons, what was read)."""
    if to not in WRITABLE_FORMATS:
        raise UsageError(f"--to {to!r}: convert writes {', '.join(WRITABLE_FORMATS)}")
    if dataset_info and to != "sharegpt":
        raise UsageError("--dataset-info describes ShareGPT files (LLaMA-Factory's own multimodal and tool-call "
                         "format): use --to sharegpt with it")
    out = Path(out)
    if out.suffix not in (".json", ".jsonl"):
        raise UsageError(f"-o {str(out)!r}: write a .json (one array) or .jsonl (one record per line) file")
    result = read_data(paths, fmt)
    write = READERS[to].write
    records, bad = [], list(result.bad)
    for sample in result.samples:
        try:
            records.append(write(sample))
        except ValueError as err:
            bad.append(bad_record(sample.source, {"id": sample.id}, err))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".jsonl":
        out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    else:
        out.write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if dataset_info:
        has = {key: any(key in r for r in records) for key in ("system", "tools", "images")}
        write_entry(out.parent / INFO_FILE, out.stem, out.name, "sharegpt", has)
    return len(records), bad, result
