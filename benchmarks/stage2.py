"""Stage-2 (instruction tuning: LoRA on the LLM + the projector) throughput and memory against transformers + peft.

    python benchmarks/stage2.py [--workdir DIR]

One epoch over the same 96 samples (batch 8, shapes in llava_setup.py; each sample a question about its image
and a 16-48 token answer, chatml), LoRA r=64 on every linear layer of the LLM plus the full projector, three
ways, each the best of `--repeats` epochs run interleaved:
  - reference: transformers' `LlavaForConditionalGeneration` with the same weights, peft LoRA on the language
    model's linear layers, the projector trained, a plain AdamW loop, trained the straightforward way (images
    decoded and encoded every step, batches padded to the longest, full-vocabulary logits);
  - llava-kit: `llava_kit.train.engine.train` (stage sft: the HF Trainer, feature cache, loss at labelled
    positions, grouped batches);
  - limit: the LLM with its LoRA adapters, forward + backward alone on llava-kit's batches, loss at the labelled
    positions (no tower, no projector).
Prints `stage2_vs_reference`, `stage2_vs_limit` and `stage2_memory_vs_reference` (peak RSS of a process running
one epoch each way).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llava_setup import BATCH, build_workdir, reference_from, reference_loader, stage1_config  # noqa: E402

from llava_kit.config import config_from_dict  # noqa: E402
from llava_kit.data.encode import IGNORE_INDEX  # noqa: E402
from llava_kit.train.engine import train  # noqa: E402

LORA = {"r": 64, "alpha": 128, "dropout": 0.05, "target_modules": "all-linear"}


def stage2_config(paths: dict, output_dir: Path, cache_dir: Path, **train_overrides) -> dict:
    """The llava-kit sft run on the benchmark data: LoRA on every linear layer of the LLM + the projector."""
    cfg = stage1_config(paths, output_dir, cache_dir, **train_overrides)
    cfg["stage"] = "sft"
    cfg["model"]["lora"] = LORA
    cfg["model"]["trainable"] = {"llm": "lora", "projector": "full"}
    cfg["data"].update(path=str(paths["sft"]), template="chatml")
    return cfg


def write_sft_data(paths: dict) -> dict:
    """The captions as answers to a question: the same images, a chat template, the loss on the answers only."""
    sft = paths["data"].with_name("sft.json")
    if not sft.is_file():
        records = json.loads(paths["data"].read_text())
        for record in records:
            record["conversations"][0]["value"] = "<image>\nWhat do you see in this image? Describe it in detail."
        sft.write_text(json.dumps(records))
    return {**paths, "sft": sft}


def run_llava_kit(paths: dict, out: Path, cache: Path, **train_overrides) -> float:
    """One llava-kit sft epoch; returns the Trainer's train_runtime (the epoch, after the cache is built)."""
    train(config_from_dict(stage2_config(paths, out, cache, **train_overrides)), overwrite=True)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(h["train_runtime"] for h in history if "train_runtime" in h)


def _lora_on(module, target: str):
    """peft LoRA with our settings on `module`'s linear layers matching `target` (a regex of module names)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(module, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules=target))


def reference_setup(paths: dict, root: Path):
    """(llava-kit's base model, its DataLoader) on the sft data: the reference's batches, padded to the longest."""
    return reference_loader(stage2_config(paths, root / "unused", root / "unused-cache"))


def run_reference(paths: dict, root: Path) -> float:
    """One epoch of transformers' llava + peft trained the straightforward way; returns its seconds."""
    model, loader = reference_setup(paths, root)
    reference = reference_from(model)
    reference.requires_grad_(False)
    # LoRA on every linear layer of the language model (peft's all-linear leaves out lm_head: so does this regex)
    reference = _lora_on(reference, r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|"
                                    r"down_proj)")
    projector = reference.base_model.model.model.multi_modal_projector
    projector.requires_grad_(True)
    reference.train()
    optimizer = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-3)
    start = time.perf_counter()
    for batch in loader:  # images decoded and preprocessed every epoch, the tower run every step
        loss = reference(**batch).loss  # full [batch, seq, 32000] logits
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return time.perf_counter() - start


def run_limit(paths: dict, root: Path) -> float:
    """The LLM with LoRA, forward + backward on llava-kit's batches, loss at labelled positions, AdamW on the
    adapters: what an sft step cannot go below."""
    from torch.utils.data import DataLoader

    from llava_kit.data.sampling import ModalityLengthGroupedSampler

    model, padded = reference_setup(paths, root)
    dataset = padded.dataset
    sampler = ModalityLengthGroupedSampler(dataset.lengths, dataset.has_images, BATCH, seed=0)
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler, collate_fn=padded.collate_fn)
    llm = model.language_model
    llm.requires_grad_(False)
    llm = _lora_on(llm, r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)").train()
    optimizer = torch.optim.AdamW([p for p in llm.parameters() if p.requires_grad], lr=1e-3)
    base = llm.get_base_model()
    batches = list(loader)  # decode outside the timing: the limit is the LLM alone
    start = time.perf_counter()
    for batch in batches:
        embeds = base.get_input_embeddings()(batch["input_ids"])
        hidden = base.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], use_cache=False)[0]
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE_INDEX
        loss = F.cross_entropy(base.lm_head(hidden[:, :-1][keep]), targets[keep])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return time.perf_counter() - start


def peak_rss_mb(mode: str, workdir: Path) -> float:
    """Peak resident memory of a fresh process running one sft epoch the `mode` way."""
    result = subprocess.run([sys.executable, __file__, "--workdir", str(workdir), "--rss-of", mode],
                            capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="reuse models and data here (default: temp)")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs of each kind (best of)")
    parser.add_argument("--rss-of", choices=["llava-kit", "reference"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="llava-kit-bench-"))
    paths = write_sft_data(build_workdir(workdir))
    cache = workdir / "cache"

    if args.rss_of:  # child process of peak_rss_mb(): run one epoch, print the peak RSS in MB
        if args.rss_of == "llava-kit":
            run_llava_kit(paths, workdir / "rss-run", cache)  # the cache, filled by the parent
        else:
            run_reference(paths, workdir)
        hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
        print(int(re.split(r"\s+", hwm)[1]) / 1024)
        return 0

    run_llava_kit(paths, workdir / "warmup", cache, max_steps=2)  # imports, allocator, the feature cache
    ours, references, limits = [], [], []
    for repeat in range(args.repeats):  # interleaved: a change of machine load falls on all three alike
        ours.append(run_llava_kit(paths, workdir / f"run{repeat}", cache))
        limits.append(run_limit(paths, workdir))
        references.append(run_reference(paths, workdir))
    ours_s, reference_s, limit_s = min(ours), min(references), min(limits)
    rss_ours, rss_reference = peak_rss_mb("llava-kit", workdir), peak_rss_mb("reference", workdir)
    print(f"sft epoch seconds: reference {reference_s:.2f}, llava-kit {ours_s:.2f}, limit {limit_s:.2f} (best of "
          f"{args.repeats}); peak RSS MB: llava-kit {rss_ours:.0f}, reference {rss_reference:.0f}", file=sys.stderr)
    print(f"stage2_vs_reference: {reference_s / ours_s:.2f}")
    print(f"stage2_vs_limit: {ours_s / limit_s:.2f}")
    print(f"stage2_memory_vs_reference: {rss_ours / rss_reference:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
