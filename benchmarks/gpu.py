"""LLaVA-1.5-sized training steps on a GPU: llava-kit against transformers' llava + peft, and what they project to.

    python benchmarks/gpu.py                 # a CUDA GPU: CLIP-L/336 + a 7B Llama, bf16 (random weights)
    python benchmarks/gpu.py --tiny          # the same code path on the CPU, tiny shapes, fp32 (the smoke test)

Not part of `run.py` and never needed by the tests (tests/unit/test_benchmark_gpu.py runs `--tiny`). Without a
CUDA device and without `--tiny` it says so and exits with status 2.

The model: a CLIP ViT-L/14 at 336 px (24 layers x 1024, 576 patch tokens, feature layer -2), the mlp2x_gelu
projector, a Llama-2-7B-shaped LLM (32 layers x 4096, 11008 MLP, vocabulary 32,000), all random (configs built
here, no downloads), bf16, flash-attention 2 where the `flash-attn` package is installed (else sdpa), gradient
checkpointing of the LLM on both sides (LLaVA-1.5 trains with it). Synthetic samples of LLaVA-1.5's shape: stage 1,
an image + a 16-48 token caption; stage 2, an image + a 48-token question + a 32-384 token answer, the loss on the
answer.

Measured, each the mean of `--steps` steps after `--warmup`:
  - llava-kit stage 2, packing off and on: `LlavaModel` (loss at labelled positions) with LoRA r=128 (alpha 256)
    on every linear layer of the LLM (llava-kit's `apply_trainability`) and the projector trained, llava-kit's
    collators (padding to the longest of the batch, or packed blocks of `--block` tokens with restarting
    positions), the tower's features from the frozen-feature cache (computed once, outside the timing, as the
    cache does in the first epoch; `tower images/s` is that cost);
  - the reference stage 2: transformers' `LlavaForConditionalGeneration` with the same weights, peft LoRA with
    the same settings, trained the straightforward way (the tower every step, padded batches, full-vocabulary
    logits and loss);
  - stage 1 both ways (projector only, LLM frozen, no LoRA), for the projection.
For each: samples/s, tokens/s (real tokens, image tokens included), MFU (model FLOPs of the LLM's forward and
backward over the real tokens, 4 x parameters x tokens + attention, plus the tower's forward, over the GPU's
peak bf16 FLOPs: `--peak-tflops`, default from the device name), peak memory. Then LLaVA-1.5's stage 1 (558K
samples) and stage 2 (665K) on 8 GPUs of this kind at the measured per-GPU rate (data-parallel scaling assumed
perfect), next to the published 3.5 h and 10 h on 8 x A100.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llava_setup import reference_from  # noqa: E402

LLAVA_15 = {"stage 1": (558_000, 3.5), "stage 2": (665_000, 10.0)}  # samples, published hours on 8 x A100
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}
IMAGE_TOKEN_ID = 3  # a reserved id of the synthetic vocabulary (real tokens are drawn above 10)
PAD_ID = 0


@dataclass
class Shapes:
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_mlp: int
    llm_width: int
    llm_layers: int
    llm_heads: int
    llm_mlp: int
    vocab: int
    lora_r: int
    caption_tokens: tuple[int, int]
    question_tokens: int
    answer_tokens: tuple[int, int]

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


FULL = Shapes(image_size=336, patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16, vision_mlp=4096,
              llm_width=4096, llm_layers=32, llm_heads=32, llm_mlp=11008, vocab=32_000, lora_r=128,
              caption_tokens=(16, 48), question_tokens=48, answer_tokens=(32, 384))
TINY = Shapes(image_size=56, patch_size=14, vision_width=64, vision_layers=2, vision_heads=2, vision_mlp=128,
              llm_width=64, llm_layers=2, llm_heads=2, llm_mlp=128, vocab=512, lora_r=8,
              caption_tokens=(4, 8), question_tokens=6, answer_tokens=(4, 12))


# ---------------------------------------------------------------------------------------------- models

def attention_implementation(device: torch.device) -> str:
    """flash_attention_2 on a GPU with the flash-attn package, else sdpa (what llava-kit's engine chooses too)."""
    from llava_kit.train.engine import choose_attn_implementation

    return choose_attn_implementation("auto", "bf16", device.type == "cuda") or "sdpa"


def build_models(shapes: Shapes, device: torch.device, dtype: torch.dtype, attention: str):
    """(llava-kit's LlavaModel, transformers' LlavaForConditionalGeneration) with the same random weights."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from llava_kit.model.llava import LlavaModel
    from llava_kit.model.projectors import build_projector
    from llava_kit.model.vision import TransformersVisionTower

    side = shapes.image_size // shapes.patch_size
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # built in place: a 7B initialised on the CPU takes minutes
            torch.manual_seed(0)
            vision = CLIPVisionModel(CLIPVisionConfig(
                image_size=shapes.image_size, patch_size=shapes.patch_size, hidden_size=shapes.vision_width,
                num_hidden_layers=shapes.vision_layers, num_attention_heads=shapes.vision_heads,
                intermediate_size=shapes.vision_mlp, projection_dim=shapes.vision_width))
            processor = CLIPImageProcessor(size={"shortest_edge": shapes.image_size},
                                           crop_size={"height": shapes.image_size, "width": shapes.image_size})
            tower = TransformersVisionTower(vision, processor, name_or_path="random-clip", has_cls=True,
                                            feature_layer=-2, select_strategy="patch")
            projector = build_projector("mlp2x_gelu", shapes.vision_width, shapes.llm_width, (side, side))
            llm = LlamaForCausalLM(LlamaConfig(
                vocab_size=shapes.vocab, hidden_size=shapes.llm_width, intermediate_size=shapes.llm_mlp,
                num_hidden_layers=shapes.llm_layers, num_attention_heads=shapes.llm_heads,
                num_key_value_heads=shapes.llm_heads, max_position_embeddings=4096, pad_token_id=PAD_ID,
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, attn_implementation=attention))
            model = LlavaModel.from_parts(tower, projector, llm, IMAGE_TOKEN_ID)
            reference = reference_from(model)
    finally:
        torch.set_default_dtype(previous)
    reference.set_attn_implementation({"text_config": attention})  # the LLM, as llava-kit's; the tower keeps sdpa
    return model, reference.to(device)


def train_llava_kit(model, stage: int, shapes: Shapes, checkpointing: bool):
    """llava-kit's trainability for the stage (stage 2: LoRA on every linear layer of the LLM + the projector)."""
    from llava_kit.config import LoraConfig, TrainableConfig
    from llava_kit.model.trainable import apply_trainability

    trainable = TrainableConfig(llm="lora" if stage == 2 else "frozen", projector="full")
    lora = LoraConfig(r=shapes.lora_r, alpha=2 * shapes.lora_r, dropout=0.05, target_modules="all-linear")
    apply_trainability(model, trainable, lora, gradient_checkpointing=checkpointing)
    if checkpointing:  # as llava-kit's engine does on a GPU
        model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def train_reference(reference, stage: int, shapes: Shapes, checkpointing: bool):
    """peft LoRA with the same settings on the reference's language model (stage 2), the projector trained."""
    reference.requires_grad_(False)
    if stage == 2:
        from peft import LoraConfig, get_peft_model

        reference = get_peft_model(reference, LoraConfig(
            r=shapes.lora_r, lora_alpha=2 * shapes.lora_r, lora_dropout=0.05,
            target_modules=r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"))
        projector = reference.base_model.model.model.multi_modal_projector
    else:
        projector = reference.model.multi_modal_projector
    projector.requires_grad_(True)
    if checkpointing:
        reference.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return reference.train()


# ---------------------------------------------------------------------------------------------- data

def samples(shapes: Shapes, stage: int, n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of `n` synthetic samples: the image's placeholders, then text; labels on the answer."""
    from llava_kit.data.encode import IGNORE_INDEX

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if stage == 1:
            prompt, answer = 2, rng.randint(*shapes.caption_tokens)
        else:
            prompt, answer = shapes.question_tokens, rng.randint(*shapes.answer_tokens)
        text = [rng.randrange(10, shapes.vocab) for _ in range(prompt + answer)]
        ids = [1] + [IMAGE_TOKEN_ID] * shapes.image_tokens + text
        labels = [IGNORE_INDEX] * (1 + shapes.image_tokens + prompt) + text[prompt:]
        out.append((ids, labels))
    return out


def batches(examples, micro_batch: int, packing: bool, block: int, features: torch.Tensor | None,
            pixels: torch.Tensor | None) -> list[dict]:
    """llava-kit's collators over the examples (each with its image): padded batches, or packed blocks."""
    from llava_kit.data.dataset import Collator
    from llava_kit.data.packing import PackedCollator, pack_examples

    def image_of(i: int) -> dict:
        out = {}
        if features is not None:
            out["vision_features"] = features[i % len(features)][None]
        if pixels is not None:
            out["pixel_values"] = pixels[i % len(pixels)][None]
        return out

    if not packing:
        items = [{"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), **image_of(i)}
                 for i, (ids, labels) in enumerate(examples)]
        collate = Collator(PAD_ID)
        return [collate(items[i:i + micro_batch]) for i in range(0, len(items), micro_batch)]
    # whole samples, greedily, in order (pack_examples without splitting), each block with its samples' images
    blocks, members, used = pack_examples(examples, block, split_documents=False), [], 0
    for block_ in blocks:
        count = sum(1 for p in block_.position_ids if p == 0)
        members.append(list(range(used, used + count)))
        used += count
    items = []
    for block_, indices in zip(blocks, members, strict=True):
        images = [image_of(i) for i in indices]
        item = {"input_ids": torch.tensor(block_.input_ids), "labels": torch.tensor(block_.labels),
                "position_ids": torch.tensor(block_.position_ids)}
        for key in ("vision_features", "pixel_values"):
            if images and key in images[0]:
                item[key] = torch.cat([image[key] for image in images])
        items.append(item)
    collate = PackedCollator(PAD_ID)
    rows = max(1, micro_batch * sum(map(len, (e[0] for e in examples))) // (len(examples) * block))  # same tokens
    return [collate(items[i:i + rows]) for i in range(0, len(items), rows)]


# ---------------------------------------------------------------------------------------------- timing

@dataclass
class Result:
    name: str
    samples_per_s: float
    tokens_per_s: float
    mfu: float | None
    peak_gb: float | None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(name: str, model, step_batches: list[dict], samples_per_step: list[int], tokens_per_step: list[int],
              flops_per_step: list[float], device: torch.device, warmup: int, peak_tflops: float | None,
              reference: bool = False) -> Result:
    """Train `model` on the batches with AdamW (the trainable parameters); time the steps after `warmup`."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start, timed = None, slice(warmup, None)
    for i, batch in enumerate(step_batches):
        if i == warmup:
            synchronize(device)
            start = time.perf_counter()
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if reference:  # transformers' llava: pixel values through the tower, full logits and loss
            batch.pop("vision_features", None)
            loss = model(**batch).loss
        else:
            loss = model(**batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    seconds = time.perf_counter() - start
    flops = sum(flops_per_step[timed])
    mfu = flops / seconds / (peak_tflops * 1e12) if peak_tflops else None
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del optimizer
    return Result(name, sum(samples_per_step[timed]) / seconds, sum(tokens_per_step[timed]) / seconds, mfu, peak)


def llm_flops(shapes: Shapes, batch: dict, llm_parameters: int, tower_parameters: int) -> float:
    """Model FLOPs of one training step: the LLM's forward and input-gradient backward (4 x parameters x real tokens;
    the frozen base needs no weight gradients) plus causal attention, and the tower's forward per image."""
    if "attention_mask" in batch:
        lengths = batch["attention_mask"].sum(-1).tolist()
    else:  # packed: each sample's length is where its positions restart
        lengths = []
        for row in batch["position_ids"].tolist():
            starts = [i for i, p in enumerate(row) if p == 0] + [len(row)]
            lengths += [b - a for a, b in zip(starts, starts[1:], strict=False)]
    tokens = sum(lengths)
    attention = sum(2 * 2 * n * n / 2 * shapes.llm_width * shapes.llm_layers for n in lengths) * 2  # fwd + bwd
    images = int((batch["input_ids"] == IMAGE_TOKEN_ID).sum()) // shapes.image_tokens
    return 4 * llm_parameters * tokens + attention + 2 * tower_parameters * (shapes.image_tokens + 1) * images


def measure(shapes: Shapes, device: torch.device, dtype: torch.dtype, steps: int, warmup: int, micro_batch: int,
            block: int, packing_modes: list[bool], peak_tflops: float | None, checkpointing: bool) -> dict:
    attention = attention_implementation(device)
    print(f"gpu.py: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), {dtype}, "
          f"attention {attention}, LoRA r={shapes.lora_r}, micro-batch {micro_batch}, steps {warmup}+{steps}",
          file=sys.stderr, flush=True)
    model, reference = build_models(shapes, device, dtype, attention)
    llm_parameters = sum(p.numel() for p in model.language_model.parameters())
    tower_parameters = sum(p.numel() for p in model.vision_tower.parameters())
    n_steps = warmup + steps

    # One image per distinct sample position in a step (random pixels), and its features as the cache holds them.
    torch.manual_seed(0)
    pixels = torch.randn(micro_batch, 3, shapes.image_size, shapes.image_size, dtype=dtype)
    with torch.no_grad():
        synchronize(device)
        start = time.perf_counter()
        features = model.vision_tower.encode(pixels.to(device)).to(dtype).cpu()  # [n, patches, width]
        synchronize(device)
    tower_rate = micro_batch / (time.perf_counter() - start)

    results: dict[str, Result] = {}
    for stage in (1, 2):
        examples = samples(shapes, stage, micro_batch * n_steps, seed=stage)
        # each way gets the same samples: padded for the reference (and llava-kit without packing)
        padded_ref = batches(examples, micro_batch, False, block, None, pixels)
        ours_model = train_llava_kit(model, stage, shapes, checkpointing)  # stage 2 adds LoRA to stage 1's model
        for packing in (packing_modes if stage == 2 else [False]):
            ours = batches(examples, micro_batch, packing, block, features, None)
            counts = [int((b["input_ids"] == IMAGE_TOKEN_ID).sum()) // shapes.image_tokens for b in ours]
            tokens = [_real_tokens(b) for b in ours]
            flops = [llm_flops(shapes, b, llm_parameters, tower_parameters) for b in ours]
            name = f"stage {stage} llava-kit" + (f", packing {'on' if packing else 'off'}" if stage == 2 else "")
            results[name] = run_steps(name, ours_model, ours, counts, tokens, flops, device,
                                      min(warmup, len(ours) - 1), peak_tflops)
            print(_line(results[name]), file=sys.stderr, flush=True)
        ref_model = train_reference(reference, stage, shapes, checkpointing)
        counts = [len(b["input_ids"]) for b in padded_ref]
        tokens = [_real_tokens(b) for b in padded_ref]
        flops = [llm_flops(shapes, b, llm_parameters, tower_parameters) for b in padded_ref]
        name = f"stage {stage} reference"
        results[name] = run_steps(name, ref_model, padded_ref, counts, tokens, flops, device, warmup, peak_tflops,
                                  reference=True)
        print(_line(results[name]), file=sys.stderr, flush=True)
        if stage == 1:
            reference = ref_model  # stage 2 wraps the same reference with LoRA
    return {"results": results, "tower_images_per_s": tower_rate, "attention": attention}


def _real_tokens(batch: dict) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int((batch["input_ids"] != PAD_ID).sum())


def _line(r: Result) -> str:
    mfu = f", MFU {r.mfu:.1%}" if r.mfu is not None else ""
    peak = f", peak memory {r.peak_gb:.1f} GiB" if r.peak_gb is not None else ""
    return f"{r.name}: {r.samples_per_s:.2f} samples/s, {r.tokens_per_s:,.0f} tokens/s{mfu}{peak}"


def peak_tflops_of(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_TFLOPS.items() if key in name), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, fp32, on the CPU (or --device)")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each way (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--micro-batch", type=int, default=None, help="samples per step (default 16; 2 with --tiny)")
    parser.add_argument("--block", type=int, default=None, help="packed block tokens (default 4096; 256 with --tiny)")
    parser.add_argument("--packing", choices=["both", "on", "off"], default="both")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak bf16 TFLOPs (MFU)")
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu.py: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine, or with "
              "--tiny for the CPU smoke run of the same code", file=sys.stderr)
        return 2
    shapes = TINY if args.tiny else FULL
    dtype = torch.float32 if args.tiny else torch.bfloat16
    micro_batch = args.micro_batch or (2 if args.tiny else 16)
    block = args.block or (256 if args.tiny else 4096)
    modes = {"both": [False, True], "on": [True], "off": [False]}[args.packing]
    peak = args.peak_tflops or peak_tflops_of(device)
    out = measure(shapes, device, dtype, args.steps, args.warmup, micro_batch, block, modes, peak,
                  checkpointing=not args.no_gradient_checkpointing and not args.tiny)
    results = out["results"]

    print(f"tower (feature-cache build): {out['tower_images_per_s']:.1f} images/s")
    for result in results.values():
        print(_line(result))
    for stage in (1, 2):
        ref = results[f"stage {stage} reference"]
        for name, result in results.items():
            if name.startswith(f"stage {stage} llava-kit"):
                label = name.removeprefix(f"stage {stage} llava-kit").strip(", ").replace(" ", "_") or "padded"
                print(f"gpu_stage{stage}_{label}_vs_reference: {result.samples_per_s / ref.samples_per_s:.2f} "
                      "(samples/s)" + (f", memory {result.peak_gb / ref.peak_gb:.2f}" if ref.peak_gb else ""))
    if not args.tiny:
        gpu = torch.cuda.get_device_name(device)
        for stage, (n_samples, published) in LLAVA_15.items():
            best = max((r for n, r in results.items() if n.startswith(stage) and "llava-kit" in n),
                       key=lambda r: r.samples_per_s)
            ref = results[f"{stage} reference"]
            # stage 1 also pays the cache build once (every image through the tower)
            cache_h = n_samples / (8 * out["tower_images_per_s"]) / 3600
            hours, ref_hours = n_samples / (8 * best.samples_per_s) / 3600, n_samples / (8 * ref.samples_per_s) / 3600
            print(f"LLaVA-1.5 {stage} ({n_samples:,} samples) on 8 x {gpu}: llava-kit {hours:.2f} h "
                  f"(+ {cache_h:.2f} h to build the feature cache, once), reference {ref_hours:.2f} h; published "
                  f"{published} h on 8 x A100")
    return 0


if __name__ == "__main__":
    sys.exit(main())
