"""Chat decoding speed: llava-kit's generation path against `LlavaForConditionalGeneration.generate`.

llava-kit's path is the one `llava-kit chat` takes: `LlavaModel.generate`, which decodes with the loop of
`llava_kit/model/generation.py` (not transformers' `generate`).

    python benchmarks/decode.py [--workdir DIR]

Same weights (llava_setup.py shapes: CLIP 6x256 at 224 px, Llama 4x256, vocabulary 32,000), same prompt
(one image + a question through the chat template), greedy, 64 new tokens forced (`min_new_tokens`).
Time to first token = a 1-token generation (tower + projector + prefill + one LM-head row); decode
speed = the extra tokens of a 65-token generation over its extra time. Best of several interleaved repeats.
Prints `decode_vs_reference` (tokens/s ÷ reference) and `ttft_vs_reference` (seconds ÷ reference).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llava_setup import build_workdir, reference_from, stage1_config  # noqa: E402

from llava_kit.config import config_from_dict  # noqa: E402
from llava_kit.data.encode import encode_messages  # noqa: E402
from llava_kit.data.images import load_image, prepare_image  # noqa: E402
from llava_kit.model.build import build_llava  # noqa: E402

NEW_TOKENS = 64


def best_seconds(runs: dict, repeats: int) -> dict:
    """The best time of each of `runs` (name: function) over `repeats` rounds of one call each.

    Rounds interleave the functions, so that load from other processes, which comes and goes, falls on
    llava-kit and the reference alike rather than on whichever happened to be timed at the time.
    """
    for fn in runs.values():  # warm-up
        fn()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="reuse models and data here (default: temp)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    paths = build_workdir(args.workdir or Path(tempfile.mkdtemp(prefix="llava-kit-bench-")))
    cfg = config_from_dict(stage1_config(paths, paths["data"].parent / "unused", paths["data"].parent / "unused"))
    model, tokenizer = build_llava(cfg.model)
    model.eval()
    reference = reference_from(model)
    tower = model.vision_tower

    image = prepare_image(load_image(str(paths["images"] / "0000.png")), "resize", tower.image_mean)
    pixel_values = tower.preprocess([image])  # [1, 3, 224, 224]
    prompt = encode_messages([{"role": "user", "content": "<image>\nDescribe the image."}], tokenizer, "chatml",
                             model.image_token_id, model.tokens_per_image, max_seq_len=None, n_images=1,
                             add_generation_prompt=True)
    input_ids = torch.tensor([prompt.input_ids])
    attention_mask = torch.ones_like(input_ids)
    greedy = {"do_sample": False, "pad_token_id": tokenizer.pad_token_id}

    def ours(n: int) -> torch.Tensor:  # the path of `llava-kit chat` (ChatSession.ask -> LlavaModel.generate)
        return model.generate(input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                              max_new_tokens=n, min_new_tokens=n, **greedy)

    def theirs(n: int) -> torch.Tensor:
        with torch.no_grad():
            out = reference.generate(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                     max_new_tokens=n, min_new_tokens=n, **greedy)
        return out[:, input_ids.shape[1]:]

    if not torch.equal(ours(16), theirs(16)):
        print("llava-kit and the reference generate different tokens: the comparison is void", file=sys.stderr)
        return 1
    generators = {"llava-kit": ours, "reference": theirs}
    best = best_seconds({(name, n): (lambda g=g, n=n: g(n)) for name, g in generators.items()
                         for n in (1, NEW_TOKENS + 1)}, args.repeats)
    timings = {name: (best[name, 1], NEW_TOKENS / (best[name, NEW_TOKENS + 1] - best[name, 1]))
               for name in generators}  # (TTFT s, decode tokens/s)
    (ttft, rate), (ttft_ref, rate_ref) = timings["llava-kit"], timings["reference"]
    print(f"TTFT ms: llava-kit {ttft * 1000:.1f}, reference {ttft_ref * 1000:.1f}; decode tokens/s: llava-kit "
          f"{rate:.1f}, reference {rate_ref:.1f} (prompt {input_ids.shape[1]} tokens, {NEW_TOKENS} new)",
          file=sys.stderr)
    print(f"decode_vs_reference: {rate / rate_ref:.2f}")
    print(f"ttft_vs_reference: {ttft / ttft_ref:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
