"""Stage-1 (projector pretraining) throughput and memory: llava-kit against transformers' llava.

    python benchmarks/stage1.py [--workdir DIR]

One epoch over the same 96 samples (batch 8, shapes in llava_setup.py), three ways, each the best of
`--repeats` epochs run interleaved:
  - reference: `LlavaForConditionalGeneration` with the same weights, trained the straightforward way
    (tower frozen, projector trained by AdamW, images decoded and encoded every step, batches padded to
    the longest, full-vocabulary logits), a plain loop;
  - llava-kit: `llava_kit.train.engine.train` (the HF Trainer), cold feature cache then warm;
  - limit: the LLM forward + backward alone on the same batches, loss at the labelled positions.
The limit runs on the batches llava-kit's sampler forms (same tokens, same padding).
Prints `stage1_vs_reference`, `stage1_first_epoch_vs_reference`, `stage1_vs_limit` and
`memory_vs_reference` (peak RSS of a process running each stage-1 epoch).
"""

from __future__ import annotations

import argparse
import json
import shutil
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


def run_llava_kit(paths: dict, out: Path, cache: Path, **train_overrides) -> tuple[float, float]:
    """One llava-kit stage-1 epoch; returns (wall seconds of the whole train() call, Trainer's train_runtime)."""
    cfg = config_from_dict(stage1_config(paths, out, cache, **train_overrides))
    start = time.perf_counter()
    train(cfg)
    total = time.perf_counter() - start
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    runtime = next(h["train_runtime"] for h in history if "train_runtime" in h)
    return total, runtime


def reference_batches(paths: dict, root: Path):
    """The reference's data: llava-kit's tokenisation, images decoded every step, padded to the longest."""
    return reference_loader(stage1_config(paths, root / "unused", root / "unused-cache"))


def run_reference(paths: dict, root: Path) -> float:
    """One epoch of the straightforward loop; returns its seconds."""
    model, loader = reference_batches(paths, root)
    reference = reference_from(model).train()
    reference.requires_grad_(False)
    reference.model.multi_modal_projector.requires_grad_(True)
    optimizer = torch.optim.AdamW(reference.model.multi_modal_projector.parameters(), lr=1e-3)
    start = time.perf_counter()
    for batch in loader:  # images are decoded and preprocessed here, every epoch
        loss = reference(**batch).loss  # full [batch, seq, 32000] logits
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return time.perf_counter() - start


def run_limit(paths: dict, root: Path) -> float:
    """The LLM forward + backward (to its input embeddings) on llava-kit's batches, loss at labelled positions."""
    from torch.utils.data import DataLoader

    from llava_kit.data.sampling import ModalityLengthGroupedSampler

    model, padded = reference_batches(paths, root)
    dataset = padded.dataset
    # The batches the Trainer forms for llava-kit (same sampler, seed and epoch): the same tokens, the same padding.
    sampler = ModalityLengthGroupedSampler(dataset.lengths, dataset.has_images, BATCH, seed=0)
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler, collate_fn=padded.collate_fn)
    llm = model.language_model
    llm.requires_grad_(False)
    batches = list(loader)  # decode outside the timing: the limit is the LLM alone
    start = time.perf_counter()
    for batch in batches:
        embeds = llm.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
        hidden = llm.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], use_cache=False)[0]
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE_INDEX
        loss = F.cross_entropy(llm.lm_head(hidden[:, :-1][keep]), targets[keep])
        loss.backward()
    return time.perf_counter() - start


def peak_rss_mb(mode: str, workdir: Path) -> float:
    """Peak resident memory of a fresh process running one stage-1 epoch the `mode` way."""
    result = subprocess.run([sys.executable, __file__, "--workdir", str(workdir), "--rss-of", mode],
                            capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="reuse models and data here (default: temp)")
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs of each kind (best of)")
    parser.add_argument("--rss-of", choices=["llava-kit", "reference"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="llava-kit-bench-"))
    paths = build_workdir(workdir)

    if args.rss_of:  # child process of peak_rss_mb(): run one epoch, print the peak RSS in MB
        if args.rss_of == "llava-kit":  # the warm cache, filled by the parent
            run_llava_kit(paths, workdir / "rss-run", workdir / "cache-0")
        else:
            run_reference(paths, workdir)
        # VmHWM belongs to this program's address space; ru_maxrss would include the parent's (it survives exec).
        hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
        print(int(hwm.split()[1]) / 1024)
        return 0

    run_llava_kit(paths, workdir / "warmup", workdir / "cache-unused", max_steps=2)  # imports, allocator
    # Best of REPEATS, the measurements interleaved: a change of machine load then falls on all of them alike
    # (timed one after the other, a busy moment moved the ratios by 10-20%). Each repeat builds a fresh cache (cold)
    # and then trains from it (warm).
    first_epochs, warm_runtimes, references, limits = [], [], [], []
    for repeat in range(args.repeats):
        cache = workdir / f"cache-{repeat}"
        shutil.rmtree(cache, ignore_errors=True)
        cold_total, _ = run_llava_kit(paths, workdir / f"cold{repeat}", cache)
        warm_total, warm_runtime = run_llava_kit(paths, workdir / f"warm{repeat}", cache)
        # The cold call differs from the warm one by the cache build (hashing + encoding every image).
        first_epochs.append(warm_runtime + (cold_total - warm_total))
        warm_runtimes.append(warm_runtime)
        limits.append(run_limit(paths, workdir))  # right after llava-kit: the reference leaves a bigger heap behind
        references.append(run_reference(paths, workdir))
    first_epoch, warm_runtime, reference, limit = min(first_epochs), min(warm_runtimes), min(references), min(limits)
    rss_ours, rss_reference = peak_rss_mb("llava-kit", workdir), peak_rss_mb("reference", workdir)
    print(f"epoch seconds: reference {reference:.2f}, llava-kit warm {warm_runtime:.2f}, "
          f"first epoch with the cache build {first_epoch:.2f}, limit {limit:.2f} (best of {args.repeats}); "
          f"peak RSS MB: llava-kit {rss_ours:.0f}, reference {rss_reference:.0f}", file=sys.stderr)
    print(f"stage1_vs_reference: {reference / warm_runtime:.2f}")
    print(f"stage1_first_epoch_vs_reference: {reference / first_epoch:.2f}")
    print(f"stage1_vs_limit: {warm_runtime / limit:.2f}")
    print(f"memory_vs_reference: {rss_ours / rss_reference:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
