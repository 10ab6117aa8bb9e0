"""Run configuration: YAML -> typed models (llava_kit/schema.py), `key=value` overrides, validation up front.

    cfg = load_config("configs/tiny/pretrain.yaml", ["output_dir=runs/x", "train.max_steps=20"])

Every problem is collected and raised together in one `ConfigError`; an unknown key names the
nearest valid one. Types and choices (every enum-like key) are checked first, by the schema; the cross-field
checks of `validate` follow on a well-typed config. The resolved config is saved into every run directory
(`config.yaml`), so merge and chat need nothing but the directory.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints

from llava_kit.errors import ConfigError
from llava_kit.schema import Described, Schema, did_you_mean, dump_yaml, load_yaml_file, validate_data
from llava_kit.schema import apply_overrides as apply_overrides

STAGE_MODALITY = {"pretrain": "multimodal", "sft": "multimodal", "text-pt": "text", "text-sft": "text",
                  "dpo": "multimodal", "text-dpo": "text"}
"""Which modality each stage trains, the one table to ask (llava_kit/modality.py holds what differs between them)."""
STAGES = tuple(STAGE_MODALITY)
MULTIMODAL_STAGES = tuple(s for s, m in STAGE_MODALITY.items() if m == "multimodal")
TEXT_STAGES = tuple(s for s, m in STAGE_MODALITY.items() if m == "text")
PREFERENCE_STAGES = ("dpo", "text-dpo")
"""Stages that learn from pairs of answers (chosen over rejected; llava_kit/train/preference.py, docs/preference.md)."""
PREFERENCE_LOSSES = ("sigmoid", "ipo", "simpo", "orpo")
"""`train.preference.loss_type`: DPO's sigmoid, IPO, and the reference-free SimPO and ORPO."""

# Record formats, written out once (llava_kit/data/readers/ has one reader per name; docs/data.md describes them):
# the conversation formats, those of them whose records may carry images, and every value of `data.format` (`text`
# is raw text for text-pt; `auto` detects each file's format from its records' keys).
CONVERSATION_FORMATS = ("alpaca", "sharegpt", "openai", "moss", "llava")
IMAGE_FORMATS = ("llava", "sharegpt", "openai", "alpaca")
WRITABLE_FORMATS = ("llava", "sharegpt", "openai")  # what `llava-kit data convert --to` writes
# Preference pairs (llava_kit/data/readers/preference.py): LLaMA-Factory's pairwise ShareGPT (`conversations` +
# `chosen`/`rejected`), the RLAIF-V / VLFeedback layout (`question`, `chosen`, `rejected`, `image`) and OpenAI's
# preference fine-tuning JSONL (`input.messages`, `preferred_output`, `non_preferred_output`).
PREFERENCE_FORMATS = ("pairwise", "rlaif-v", "openai-preference")
DATA_FORMATS = ("auto", "text", *CONVERSATION_FORMATS, *PREFERENCE_FORMATS)
# The one rule of which stage reads which formats: raw text for text-pt, any conversation for text-sft (records with
# images are refused there), conversations that may carry images for the multimodal stages.
STAGE_FORMATS = {"pretrain": ("auto", *IMAGE_FORMATS), "sft": ("auto", *IMAGE_FORMATS), "text-pt": ("auto", "text"),
                 "text-sft": ("auto", *CONVERSATION_FORMATS), "dpo": ("auto", *PREFERENCE_FORMATS),
                 "text-dpo": ("auto", *PREFERENCE_FORMATS)}
# What a stage does with a record longer than data.max_seq_len (data.overlong), and its default per stage: a cut
# answer teaches answers that stop mid-way, so conversations skip; a raw-text document cut at the limit is still text.
OVERLONG_POLICIES = ("skip", "truncate", "error")
STAGE_OVERLONG = {"pretrain": "skip", "sft": "skip", "text-pt": "truncate", "text-sft": "skip", "dpo": "skip",
                  "text-dpo": "skip"}
DATASET_KEYS = ("path", "format", "weight", "split", "subset")
# Chat template names (llava_kit/data/templates.py renders them); here so that config checks them without importing
# the data layer.
TEMPLATE_NAMES = ("plain", "vicuna_v1", "chatml", "tokenizer")
# Benchmark names (llava_kit/benchmarks/ registers one module each); here so that configs and the CLI check them
# without importing the benchmarks. tests/unit/test_benchmarks.py checks them against the registry.
BENCHMARK_NAMES = ("custom", "mmbench", "mmbench-cn", "mme", "pope", "scienceqa-img", "vqa")

# transformers' names, written out so a typo fails here and not deep inside the Trainer; tests/unit/test_config.py
# checks them against the installed transformers (SchedulerType, the reporting integrations, attention kernels).
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                 "warmup_stable_decay", "greedy")
REPORT_INTEGRATIONS = ("azure_ml", "clearml", "codecarbon", "comet_ml", "dagshub", "dvclive", "flyte", "kubeflow",
                       "mlflow", "neptune", "swanlab", "tensorboard", "trackio", "wandb")
# transformers' optimizer names (`TrainingArguments.optim`) that llava-kit offers; tests/unit/test_config.py checks
# them against transformers' OptimizerNames. Which need what: OPTIMIZER_NEEDS.
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop", "adamw_8bit",
              "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit", "lion_32bit", "paged_lion_8bit",
              "paged_lion_32bit", "galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise",
              "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise")
GALORE_OPTIMIZERS = tuple(o for o in OPTIMIZERS if o.startswith("galore"))
BNB_OPTIMIZERS = tuple(o for o in OPTIMIZERS if "8bit" in o or "paged" in o or o.startswith("lion"))
OPTIMIZER_NEEDS = {o: (("galore_torch",) if o in GALORE_OPTIMIZERS else ()) + (("bitsandbytes",) if o in BNB_OPTIMIZERS
                                                                             else ())
                   for o in OPTIMIZERS}
"""Per optimizer: the Python packages it needs (each of them also a CUDA GPU, as transformers runs them)."""
LORA_INITS = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "loftq": "loftq"}
"""`model.lora.init` -> peft's `init_lora_weights`. pissa, olora and loftq change the base weights too."""
BASE_CHANGING_INITS = ("pissa", "olora", "loftq")
ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
# transformers' pattern of an attention kernel from the hub (integrations/hub_kernels.py `is_kernel`)
HUB_KERNEL = re.compile(r"^[^/:]+/[^/:]+(?:@[^/:]+)?(?::[^/:]+)?$")

IMAGE_STRATEGIES = ("fixed", "anyres")
"""`model.vision.image_strategy` values (llava_kit/model/anyres.py implements `anyres`)."""
ANYRES_KEYS = ("grid_pinpoints", "max_tokens_per_image", "max_image_tokens_per_sample")
"""`model.vision` keys that only apply with image_strategy anyres."""
TILE_RANGE = re.compile(r"^\s*\((\d+)x(\d+)\)\s*,\s*\.\.\.\s*,\s*\((\d+)x(\d+)\)\s*$")
ANYRES_MAX = re.compile(r"^anyres_max_(\d+)$")

DataFormat = Literal[DATA_FORMATS]
ReportTarget = Literal[(*REPORT_INTEGRATIONS, "none", "all")]
HubKernel = Annotated[str, StringConstraints(pattern=HUB_KERNEL.pattern), Described("a hub kernel 'org/name'")]


class VisionConfig(Schema):
    name_or_path: str = ""
    """Hub id or local directory of a CLIP/SigLIP model, an open_clip model name, or `tiny:vision`."""
    backend: Literal["auto", "transformers", "open_clip"] = "auto"
    """Which library loads the tower; `auto` picks open_clip for directories saved by its backend."""
    pretrained: str | None = None
    """open_clip only: a pretrained tag or a checkpoint file."""
    feature_layer: int | list[int] = -2
    """Hidden state to take features from: -1 is the last block, -2 the penultimate (LLaVA-1.5); a list (e.g.
    [-2, -5, -8, -11]) concatenates those layers channel-wise (the projector sees len(list) x the tower's width)."""
    select_strategy: Literal["patch", "full"] = "patch"
    """`patch` drops the CLS token where the tower has one; `full` keeps every token."""
    image_strategy: Literal[IMAGE_STRATEGIES] = "fixed"
    """How an image reaches the tower: `fixed` (one view at the tower's input size, `data.image_aspect` says how it
    gets there) or `anyres` (LLaVA-NeXT: a base view of the whole image plus tiles of the image at the best-fitting
    grid of `grid_pinpoints`; the padded area is cut off the features and a learned newline ends each row;
    docs/high-resolution.md). Under anyres an image's token count depends on its size."""
    grid_pinpoints: list[list[int]] | str | None = None
    """anyres: the resolutions an image may be tiled at. A list of [height, width] in pixels, multiples of the tower's
    input size (transformers' `image_grid_pinpoints`, e.g. [[336, 672], [672, 336], [672, 672], [1008, 336],
    [336, 1008]]); a range of tile grids `(1x1),...,(3x3)` (every rows x cols up to the last; LLaVA-NeXT's
    notation); or `anyres_max_N`: every grid of at most N tiles. None: LLaVA-NeXT's five grids (1x2, 2x1, 2x2,
    1x3, 3x1 tiles)."""
    max_tokens_per_image: int | None = None
    """anyres: the most tokens one image may take (base view, tiles and newlines). An image that would take more has
    its tile features pooled bilinearly to a smaller grid after the projector (LLaVA-OneVision's `anyres_max`);
    None: no cap. Projectors without a token grid (resampler, perceiver, qformer) cannot pool and refuse a cap
    below their largest count."""
    max_image_tokens_per_sample: int | None = None
    """anyres: the most image tokens one sample's images take together; each of a sample's k images is capped at
    this // k (and at max_tokens_per_image), so multi-image samples pool more. None: only max_tokens_per_image."""


class LLMConfig(Schema):
    name_or_path: str = ""
    """Hub id or local directory of any causal LM transformers can load, or `tiny:llm`."""
    tokenizer: str | None = None
    """Tokenizer location when it differs from `name_or_path`."""
    trust_remote_code: bool = False
    """Run the model repository's own Python code (needed by e.g. InternLM2); only for sources you trust."""
    attn_implementation: Literal[ATTN_IMPLEMENTATIONS] | HubKernel = "auto"
    """Attention kernel for training: `auto` is flash_attention_2 on a CUDA GPU with the flash-attn package when
    training in bf16/fp16 (varlen kernels make `data.packing` pay), else transformers' default (sdpa); or a name
    transformers takes: eager, sdpa, flash_attention_2, flash_attention_3, flex_attention, or a hub kernel
    (`org/name`, e.g. kernels-community/flash-attn)."""


class ProjectorConfig(Schema):
    name: str = "mlp2x_gelu"
    """Registry name (`llava-kit projectors` lists them): linear, mlp2x_gelu, ..."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Extra constructor options of the chosen projector."""


class LoraConfig(Schema):
    r: int = 64
    """LoRA rank."""
    alpha: int = 128
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: str | list[str] = "all-linear"
    """`all-linear` (every linear layer but the LM head) or a list of module names (e.g. [q_proj, v_proj])."""
    use_rslora: bool = False
    """Rank-stabilised LoRA (peft): scale = alpha / sqrt(r) instead of alpha / r."""
    use_dora: bool = False
    """Weight-decomposed LoRA (peft DoRA): slower per step, often better at low rank."""
    init: Literal[tuple(LORA_INITS)] = "default"
    """How peft initialises the adapter (`init_lora_weights`): default (B = 0), gaussian, pissa (the principal singular
    vectors; the base keeps the residual), olora (QR), loftq (4-bit quantisation-aware: the base becomes its
    quantised residual). pissa, olora and loftq change the base, so such a run saves its LLM whole (llm/)."""
    loraplus_lr_ratio: float | None = None
    """LoRA+ (peft create_loraplus_optimizer): the B matrices learn at this multiple of the learning rate (e.g. 16);
    None: off."""


class FreezeConfig(Schema):
    train_layers: int = 2
    """`model.trainable.llm: freeze`: train the last N decoder layers of the LLM (negative: the first N)."""
    train_modules: list[str] = Field(default_factory=list)
    """... and these modules of the causal LM too, by their exact path (e.g. [lm_head, model.norm])."""


class TrainableConfig(Schema):
    vision: Literal["frozen", "full"] | None = None
    """Vision tower: frozen (default) or full."""
    projector: Literal["frozen", "full"] | None = None
    """Projector: full (default) or frozen."""
    llm: Literal["frozen", "lora", "qlora", "full", "freeze"] | None = None
    """LLM: frozen for pretrain, lora for sft and text stages by default; full fine-tunes every weight; freeze trains
    the last `model.freeze.train_layers` decoder layers (and `model.freeze.train_modules`), the rest frozen, no LoRA;
    qlora is LoRA on a 4-bit (NF4) base, which needs a CUDA GPU and bitsandbytes."""


class ModelConfig(Schema):
    vision: VisionConfig = Field(default_factory=VisionConfig)
    llm: LLMConfig = Field(default_factory=LLMConfig)
    projector: ProjectorConfig = Field(default_factory=ProjectorConfig)
    trainable: TrainableConfig = Field(default_factory=TrainableConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)
    """Which parts of the LLM `model.trainable.llm: freeze` trains."""
    init_from: str | None = None
    """A previous run directory (e.g. a pretrain run) whose projector starts this run."""


class DataConfig(Schema):
    path: str | list[str] = ""
    """Data file(s): .json (an array) or .jsonl in any format `format` names, a LLaMA-Factory dataset entry
    (`DIR/dataset_info.json#NAME`), for text stages also .txt or a `datasets` hub name."""
    format: DataFormat = "auto"
    """Record format of `path`: auto (detected per file from the records' keys, and logged), text, alpaca, sharegpt,
    openai, moss, llava; STAGE_FORMATS says which stage reads which."""
    datasets: list[Any] = Field(default_factory=list)
    """Text stages: several datasets mixed in one run, instead of `path`; each entry is a path, or has `path` and
    `format`, `weight` (copies of the dataset per epoch: 2.0 doubles it, 0.5 keeps a random half), and for hub
    names `split` (default train) and `subset`."""
    packing: bool | None = None
    """Concatenate examples into blocks of max_seq_len tokens (no padding, no token lost, no attention across
    examples); default: on for text-pt. Multimodal stages pack whole samples with their images; worth it on a GPU
    with flash-attention (varlen), slower than padding on CPU (sdpa builds a dense block mask)."""
    cache: bool = True
    """Cache tokenised data (text and multimodal) under $LLAVA_KIT_HOME/cache/tokens: a rerun starts fast."""
    image_root: str = ""
    """Directory the `image` paths are relative to."""
    template: str = "plain"
    """`plain` (pretraining), `vicuna_v1`, `chatml`, or `tokenizer` (the tokenizer's own chat template); checked
    against TEMPLATE_NAMES with the other cross-field checks."""
    system_prompt: str | None = None
    """System prompt for chat templates; None uses the template's default."""
    image_aspect: Literal["pad", "resize"] = "pad"
    """`pad` pads to a square with the tower's mean colour (LLaVA-1.5); `resize` stretches."""
    max_seq_len: int = 2048
    """Longest sequence in tokens, image tokens included; `overlong` says what happens to longer records."""
    overlong: Literal[OVERLONG_POLICIES] | None = None
    """A record longer than max_seq_len: `skip` it (reported), `truncate` it (text is cut from the end, an image never
    in part: it goes whole), or stop with an `error`. Default by stage: truncate for text-pt, skip for the others."""
    min_kept_fraction: float = 0.9
    """With overlong `skip`: the least fraction of a dataset's usable records that must fit max_seq_len; below it the
    run stops before step 1, naming the max_seq_len that keeps 99%. 0 turns the check off."""
    bad_records: Literal["skip", "error"] = "skip"
    """`skip` drops and reports bad records; `error` stops at the first one."""
    num_workers: int = 0
    """DataLoader worker processes."""
    eval_path: str | list[str] = ""
    """Held-out data file(s) in the formats of `path`, read and encoded as the training data is (same template,
    lengths, images); its loss is evaluated every `train.eval_steps` and at the end (metrics.jsonl, TensorBoard,
    loss.png). Empty: no held-out evaluation."""
    feature_cache: Literal["auto", "off"] = "auto"
    """`auto`: with a frozen vision tower, encode each image once (fp16 on disk) and train from the cached
    features; reruns over the same images skip the tower entirely. `off`: run the tower every step."""
    feature_cache_dir: str = ""
    """Where cached features live; empty means `$LLAVA_KIT_HOME/feature_cache` (~/.cache/llava-kit/...)."""


class EvalBenchmarkConfig(Schema):
    name: Literal[("", *BENCHMARK_NAMES)] = ""
    """A benchmark of `llava-kit eval --benchmark` (BENCHMARK_NAMES); empty: off."""
    data: str = ""
    """Its local file (or folder), as `llava-kit eval --data` takes it."""
    image_root: str = ""
    """The folder its image files are in (empty where the file holds its images)."""
    limit: int = Field(50, ge=0)
    """Score the first N questions only (MMBench: circular groups; MME: images); 0 = all."""
    max_new_tokens: int = Field(16, ge=1)
    """Longest answer in tokens."""


class PreferenceConfig(Schema):
    beta: float = 0.1
    """How far the policy may move from the reference: the scale of the implicit reward beta * log(pi / pi_ref)
    (sigmoid, ipo: IPO's tau; simpo: SimPO's beta, typically 2.0; orpo: the weight of the odds-ratio term)."""
    loss_type: Literal[PREFERENCE_LOSSES] = "sigmoid"
    """sigmoid (DPO), ipo (IPO, on mean per-token log-probs), simpo (SimPO: no reference, mean log-probs, a margin
    `simpo_gamma`), orpo (ORPO: no reference, the chosen answer's NLL plus beta x the odds-ratio term)."""
    label_smoothing: float = 0.0
    """Conservative DPO / robust to label noise: the assumed fraction of pairs whose labels are flipped, in
    [0, 0.5) (sigmoid and simpo)."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin gamma: the loss is -log sigmoid(beta x (mean log-prob difference) - gamma)."""
    sft_weight: float = 0.0
    """Add the chosen answer's mean NLL times this weight (LLaMA-Factory's pref_ftx, RPO's alpha): keeps the chosen
    answers likely while the rejected ones fall; 0: off (sigmoid, ipo, simpo; orpo has its own NLL term)."""


class TrainConfig(Schema):
    micro_batch_size: int = 8
    """Samples per device per forward pass."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    num_epochs: float = 1.0
    """Passes over the data (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Optimizer steps; -1 means use num_epochs."""
    learning_rate: float = 1e-3
    """Peak learning rate of the trained weights other than the projector."""
    projector_learning_rate: float | None = None
    """Peak learning rate of the projector; None uses learning_rate."""
    weight_decay: float = 0.0
    optim: Literal[OPTIMIZERS] = "adamw_torch"
    """The optimizer, by transformers' name: adamw_torch, adafactor, sgd, ...; adamw_8bit, paged_adamw_8bit, lion_*
    (bitsandbytes) and galore_* (galore_torch, full or freeze tuning, `optim_target_modules`) need a CUDA GPU."""
    optim_target_modules: list[str] = Field(default_factory=list)
    """GaLore: the modules whose gradients are projected (names or regexes transformers matches, e.g. [attn, mlp])."""
    neftune_noise_alpha: float | None = None
    """NEFTune (transformers): uniform noise of this scale (e.g. 5) on the token embeddings while training, never at
    evaluation or inference; None: off."""
    lr_scheduler: Literal[LR_SCHEDULERS] = "cosine"
    """A transformers scheduler: cosine, linear, constant, constant_with_warmup, ... (LR_SCHEDULERS lists them)."""
    lr_warmup_ratio: float = 0.03
    """Fraction of the steps spent warming up."""
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    save_steps: int = 500
    """Checkpoint every N optimizer steps (for resume)."""
    save_total_limit: int | None = 2
    """Keep at most this many checkpoints."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """`auto`: bf16 on a GPU that supports it, else fp32."""
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    """Recompute the LLM's activations in backward (less memory, ~30% more compute); `auto`: on when training on a
    CUDA GPU, off on the CPU."""
    group_by_length: bool = True
    """Multimodal stages: batches of one modality and similar lengths (less padding); false = plain shuffle."""
    deepspeed: str | None = None
    """Path of a DeepSpeed JSON config (configs/deepspeed/zero2.json, zero3.json)."""
    resume_from_checkpoint: str | None = None
    """A checkpoint-N directory, or `latest` for the newest in output_dir."""
    report_to: ReportTarget | list[ReportTarget] = "tensorboard"
    """Where the Trainer logs: tensorboard, wandb, mlflow, ... (REPORT_INTEGRATIONS), a list of them, none or all."""
    use_cpu: bool = False
    """Train on the CPU even when a GPU is present."""
    eval_steps: int | None = None
    """Evaluate the held-out loss (`data.eval_path`) every N optimizer steps, and at the end; None: every
    `save_steps`."""
    keep_best: bool = False
    """Keep the checkpoint with the lowest held-out loss (never rotated away) and end the run with its weights in
    the run directory, instead of the last step's; needs `data.eval_path`, and checkpoints at the evaluations
    (`eval_steps` = `save_steps`)."""
    eval_benchmark: EvalBenchmarkConfig = Field(default_factory=EvalBenchmarkConfig)
    """Also score a small benchmark subset at every evaluation (off by default; greedy answers of the model being
    trained, through the generation service)."""
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    """Stages dpo and text-dpo: the preference loss and its settings (docs/preference.md)."""


class RunConfig(Schema):
    stage: Literal[STAGES] = "pretrain"
    """pretrain (projector only), sft (projector + LoRA on the LLM), text-pt (the LLM alone on raw text, loss on
    every token), text-sft (the LLM alone on conversations, loss on the answers), dpo / text-dpo (preference pairs:
    the chosen answer over the rejected one, with images / text only; LoRA on the LLM)."""
    output_dir: str = ""
    """The run directory: resolved config, trained weights, metrics, loss plot, checkpoints."""
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @property
    def modality(self) -> Literal["text", "multimodal"]:
        """What the stage trains on: "text" (text-pt, text-sft: the LLM alone) or "multimodal" (pretrain, sft)."""
        return STAGE_MODALITY[self.stage]

    def resolve_defaults(self) -> None:
        """Fill the stage-dependent trainability defaults (pretrain: projector only; sft: + LoRA)."""
        t = self.model.trainable
        t.vision = t.vision or "frozen"
        # dpo tunes the LLM: the reference is then the policy with its adapter off (a trained projector needs a copy)
        t.projector = t.projector or ("frozen" if self.stage == "dpo" else "full")
        t.llm = t.llm or ("frozen" if self.stage == "pretrain" else "lora")
        if self.modality == "text":  # no tower, no projector in a text-only run
            t.vision, t.projector = "frozen", "frozen"
            if self.data.packing is None:
                self.data.packing = self.stage == "text-pt"
        elif self.data.packing is None:
            self.data.packing = False
        if self.data.overlong is None:
            self.data.overlong = STAGE_OVERLONG[self.stage]


def to_dict(cfg: Schema) -> dict:
    """A plain dict of a config (for YAML)."""
    return cfg.model_dump()


# ---------------------------------------------------------------------------------------------
# validation


def validate(cfg: RunConfig, check_paths: bool = True) -> list[str]:
    """Cross-field checks; returns the list of problems (empty when the config is usable).

    `check_paths=False` skips the checks that files exist (data, init_from, deepspeed), for
    validating recipes whose data has not been downloaded yet.
    """
    problems = []
    if not cfg.output_dir:
        problems.append("`output_dir` is empty; set it in the YAML or on the command line: output_dir=runs/my-run")
    multimodal = cfg.modality == "multimodal"
    if multimodal and not cfg.model.vision.name_or_path:
        problems.append("`model.vision.name_or_path` is empty; e.g. openai/clip-vit-large-patch14-336 or tiny:vision")
    if not cfg.model.llm.name_or_path:
        problems.append("`model.llm.name_or_path` is empty; e.g. lmsys/vicuna-7b-v1.5 or tiny:llm")
    paths = cfg.data.path if isinstance(cfg.data.path, list) else [cfg.data.path]
    if not any(paths) and not cfg.data.datasets:
        problems.append("`data.path` is empty; point it at a data file (JSON or JSONL: LLaVA, ShareGPT, OpenAI, ...) or "
                        "a LLaMA-Factory entry (DIR/dataset_info.json#NAME)"
                        + (" (or a text file, or list several in `data.datasets`)" if not multimodal else ""))
    problems += _data_problems(cfg, paths)
    if multimodal and not cfg.data.image_root:
        problems.append("`data.image_root` is empty; set the directory the records' `image` paths are relative to")
    if cfg.data.template not in TEMPLATE_NAMES:
        hint = did_you_mean(cfg.data.template, TEMPLATE_NAMES)
        problems.append(f"`data.template` is {cfg.data.template!r}{hint} (valid: {', '.join(TEMPLATE_NAMES)})")
    if cfg.modality == "text" and cfg.model.trainable.llm == "frozen":
        problems.append(f"stage `{cfg.stage}` trains the LLM; set `model.trainable.llm` to lora or full")
    if cfg.stage == "pretrain" and cfg.model.trainable.llm not in (None, "frozen"):
        problems.append("stage `pretrain` trains only the projector; remove `model.trainable.llm` or use stage `sft`")
    if cfg.model.trainable.llm == "qlora":
        problems += _qlora_problems(cfg)
    layers = cfg.model.vision.feature_layer
    if isinstance(layers, list) and not layers:
        problems.append("`model.vision.feature_layer` is an empty list; give one layer (-2) or several ([-2, -5])")
    problems += _anyres_problems(cfg)
    if cfg.data.max_seq_len < 16:
        problems.append(f"`data.max_seq_len` is {cfg.data.max_seq_len}; it must be at least 16")
    if not 0 <= cfg.data.min_kept_fraction <= 1:
        problems.append(f"`data.min_kept_fraction` must be in [0, 1] (0 turns the check off), got "
                        f"{cfg.data.min_kept_fraction}")
    t = cfg.train
    for name in ("micro_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps"):
        if getattr(t, name) < 1:
            problems.append(f"`train.{name}` must be >= 1, got {getattr(t, name)}")
    if t.max_steps <= 0 and t.num_epochs <= 0:
        problems.append("set `train.max_steps` > 0 or `train.num_epochs` > 0")
    if t.learning_rate <= 0 or (t.projector_learning_rate is not None and t.projector_learning_rate <= 0):
        problems.append("learning rates must be > 0")
    problems += _held_out_problems(cfg)
    problems += _preference_problems(cfg)
    problems += _tuning_problems(cfg)
    if not 0 <= t.lr_warmup_ratio < 1:
        problems.append(f"`train.lr_warmup_ratio` must be in [0, 1), got {t.lr_warmup_ratio}")
    if cfg.model.lora.r < 1 or cfg.model.lora.alpha <= 0:
        problems.append("`model.lora.r` must be >= 1 and `model.lora.alpha` > 0")
    if check_paths:
        entries = [{"path": d} if isinstance(d, str) else d for d in cfg.data.datasets]
        problems += _missing_paths(cfg, paths + [d.get("path") for d in entries
                                                 if isinstance(d, dict) and isinstance(d.get("path"), str)])
        held_out = cfg.data.eval_path if isinstance(cfg.data.eval_path, list) else [cfg.data.eval_path]
        problems += [f"`data.eval_path` file {p!r} does not exist" for p in held_out if p and not data_file_exists(p)]
        bench = cfg.train.eval_benchmark
        if bench.name and bench.data and not Path(bench.data).exists():
            problems.append(f"`train.eval_benchmark.data` {bench.data!r} does not exist")
    return problems


def _held_out_problems(cfg: RunConfig) -> list[str]:
    """Checks of evaluation during training: data.eval_path, train.eval_steps, keep_best, eval_benchmark."""
    problems, t = [], cfg.train
    held_out = cfg.data.eval_path
    if t.eval_steps is not None and t.eval_steps < 1:
        problems.append(f"`train.eval_steps` must be >= 1, got {t.eval_steps}")
    if not held_out:
        for key, given in (("train.eval_steps", t.eval_steps is not None), ("train.keep_best", t.keep_best),
                           ("train.eval_benchmark.name", bool(t.eval_benchmark.name))):
            if given:
                problems.append(f"`{key}` needs held-out data: set `data.eval_path` (a file in the training data's "
                                "format)")
    if t.keep_best and t.eval_steps is not None and t.eval_steps != t.save_steps:
        problems.append(f"`train.keep_best` keeps the checkpoint with the lowest held-out loss, so checkpoints are "
                        f"saved at the evaluations: set `train.eval_steps` equal to `train.save_steps` "
                        f"({t.save_steps}), or leave eval_steps out")
    if t.deepspeed and (t.keep_best or t.eval_benchmark.name):
        problems.append("`train.keep_best` and `train.eval_benchmark` are not supported with `train.deepspeed`; "
                        "evaluate the held-out loss alone (data.eval_path), or train without DeepSpeed")
    bench = t.eval_benchmark
    if bench.name and not bench.data:
        problems.append(f"`train.eval_benchmark.data` is empty; give the local file of benchmark {bench.name!r}")
    if bench.name and bench.name != "custom" and cfg.modality == "text":
        problems.append(f"`train.eval_benchmark` {bench.name!r} asks about images; stage `{cfg.stage}` trains a text "
                        "model (use `custom` with text-only questions)")
    return problems


def tile_grids(spec: str) -> list[tuple[int, int]]:
    """The tile grids (rows, cols) a string `model.vision.grid_pinpoints` names, in selection order.

    `(AxB),...,(CxD)`: every rows in A..C and cols in B..D (LLaVA-NeXT's range notation, rows first);
    `anyres_max_N`: every grid of at most N tiles. ValueError saying what is wrong otherwise.
    """
    if not isinstance(spec, str):
        raise ValueError(f"expected a string, got {spec!r}")
    match = TILE_RANGE.match(spec)
    if match:
        first_rows, first_cols, last_rows, last_cols = (int(g) for g in match.groups())
        if min(first_rows, first_cols) < 1 or first_rows > last_rows or first_cols > last_cols:
            raise ValueError(f"{spec!r} is an empty range; write (1x1),...,(3x3): rows x cols from the first to the last")
        return [(rows, cols) for rows in range(first_rows, last_rows + 1) for cols in range(first_cols, last_cols + 1)]
    match = ANYRES_MAX.match(spec)
    if match:
        most = int(match.group(1))
        if most < 1:
            raise ValueError(f"{spec!r} allows no tile; N in anyres_max_N must be at least 1")
        return [(rows, cols) for rows in range(1, most + 1) for cols in range(1, most // rows + 1)]
    raise ValueError(f"{spec!r} is neither a range of tile grids like (1x1),...,(3x3) nor anyres_max_N (e.g. "
                     "anyres_max_4), nor a list of [height, width] resolutions")


def _anyres_problems(cfg: RunConfig) -> list[str]:
    """`model.vision`'s anyres keys: only with image_strategy anyres, well-formed pinpoints, positive caps."""
    v, problems = cfg.model.vision, []
    if v.image_strategy != "anyres":
        given = [key for key in ANYRES_KEYS if getattr(v, key) is not None]
        if given:
            problems.append(f"`model.vision.{given[0]}` only applies with `model.vision.image_strategy: anyres` "
                            f"(it is {v.image_strategy!r}); set the strategy or remove {', '.join(given)}")
        return problems
    pinpoints = v.grid_pinpoints
    if isinstance(pinpoints, str):
        try:
            tile_grids(pinpoints)
        except ValueError as err:
            problems.append(f"`model.vision.grid_pinpoints`: {err}")
    elif isinstance(pinpoints, list):
        bad = [p for p in pinpoints if len(p) != 2 or min(p) < 1]
        if not pinpoints or bad:
            problems.append(f"`model.vision.grid_pinpoints` must list [height, width] resolutions in pixels (e.g. "
                            f"[[336, 672], [672, 336], [672, 672]]), got {pinpoints if not bad else bad[0]!r}")
    for key in ("max_tokens_per_image", "max_image_tokens_per_sample"):
        value = getattr(v, key)
        if value is not None and value < 1:
            problems.append(f"`model.vision.{key}` must be a positive number of tokens (or null: no cap), got {value}")
    return problems


def _preference_problems(cfg: RunConfig) -> list[str]:
    """Checks of the preference stages (dpo, text-dpo) and their `train.preference` settings."""
    problems, p, stage = [], cfg.train.preference, cfg.stage
    if stage not in PREFERENCE_STAGES:
        if p != PreferenceConfig():
            problems.append(f"`train.preference` sets the loss of stages dpo and text-dpo; stage `{stage}` does not "
                            "use it: remove it, or set `stage: dpo` (text-dpo for a text model)")
        return problems
    if p.beta <= 0:
        problems.append(f"`train.preference.beta` must be > 0, got {p.beta}")
    if not 0 <= p.label_smoothing < 0.5:
        problems.append(f"`train.preference.label_smoothing` must be in [0, 0.5) (the assumed fraction of flipped "
                        f"pairs), got {p.label_smoothing}")
    if p.sft_weight < 0 or (p.sft_weight and p.loss_type == "orpo"):
        problems.append(f"`train.preference.sft_weight` must be >= 0, and 0 with loss_type orpo (its loss holds the "
                        f"chosen answer's NLL already), got {p.sft_weight}")
    if p.label_smoothing and p.loss_type in ("ipo", "orpo"):
        problems.append(f"`train.preference.label_smoothing` applies to loss_type sigmoid and simpo; "
                        f"{p.loss_type} has none: set it to 0")
    if cfg.data.packing:
        problems.append(f"`data.packing` is not supported by stage `{stage}` (each pair is scored as two whole "
                        "sequences); set data.packing: false")
    if cfg.data.datasets and cfg.modality == "text":  # (the multimodal stages refuse it with the others)
        problems.append(f"`data.datasets` mixes text datasets; stage `{stage}` reads the files in `data.path`")
    if cfg.model.vision.image_strategy == "anyres":
        problems.append(f"stage `{stage}` reads each image at the tower's size only (its pairs are not encoded at "
                        "AnyRes yet); set `model.vision.image_strategy: fixed`")
    if cfg.model.trainable.vision == "full":
        problems.append(f"stage `{stage}` keeps the vision tower frozen (the pair's image is encoded once, for "
                        "policy and reference); set `model.trainable.vision: frozen`")
    if cfg.model.trainable.llm == "frozen" and cfg.modality == "multimodal":  # (text stages: checked for all)
        problems.append(f"stage `{stage}` tunes the LLM; set `model.trainable.llm` to lora (the reference is then the "
                        "policy with its adapter disabled) or full (a frozen copy is the reference)")
    if cfg.data.template == "plain":
        problems.append(f"stage `{stage}` needs a chat template (the answers are the assistant's turns); set "
                        "`data.template` to chatml, vicuna_v1 or tokenizer")
    return problems


def _tuning_problems(cfg: RunConfig) -> list[str]:
    """Checks of the LoRA variants and training tricks: each refused with the reason where it cannot apply."""
    problems, t, lora, llm = [], cfg.train, cfg.model.lora, cfg.model.trainable.llm
    adapter = llm in ("lora", "qlora")
    if lora.loraplus_lr_ratio is not None:
        if lora.loraplus_lr_ratio <= 0:
            problems.append(f"`model.lora.loraplus_lr_ratio` must be > 0 (typically 16), got {lora.loraplus_lr_ratio}")
        if not adapter:
            problems.append(f"`model.lora.loraplus_lr_ratio` sets the learning rate of LoRA's B matrices; "
                            f"`model.trainable.llm` is {llm}: set it to lora, or remove loraplus_lr_ratio")
    if lora.init != "default":
        if not adapter:
            problems.append(f"`model.lora.init` {lora.init} initialises a LoRA adapter; `model.trainable.llm` is {llm}")
        if lora.init == "loftq" and llm == "qlora":
            problems.append("`model.lora.init` loftq quantises the base itself; use it with `model.trainable.llm: "
                            "lora` (not qlora)")
        if lora.init in BASE_CHANGING_INITS and cfg.stage in PREFERENCE_STAGES:
            problems.append(f"`model.lora.init` {lora.init} changes the base weights, so the adapter-disabled "
                            f"reference of stage `{cfg.stage}` would not be the starting model; use init default "
                            "or gaussian")
        if lora.init in BASE_CHANGING_INITS and t.deepspeed:
            problems.append(f"`model.lora.init` {lora.init} saves the LLM whole at the end (its base changed); not "
                            "supported with `train.deepspeed`")
    if llm == "freeze":
        if cfg.model.freeze.train_layers == 0 and not cfg.model.freeze.train_modules:
            problems.append("`model.trainable.llm` freeze trains nothing: set `model.freeze.train_layers` (the last N "
                            "layers; negative: the first N) or `model.freeze.train_modules`")
    if t.neftune_noise_alpha is not None:
        if t.neftune_noise_alpha <= 0:
            problems.append(f"`train.neftune_noise_alpha` must be > 0 (typically 5), got {t.neftune_noise_alpha}")
        if cfg.stage in PREFERENCE_STAGES:
            problems.append(f"`train.neftune_noise_alpha` would noise the reference pass of stage `{cfg.stage}` too; "
                            "remove it")
    needs = OPTIMIZER_NEEDS[t.optim]
    if needs and t.use_cpu:
        problems.append(f"`train.optim` {t.optim} needs a CUDA GPU ({' and '.join(needs)}) but `train.use_cpu` is "
                        "true; use adamw_torch or adafactor on a CPU")
    if t.optim in GALORE_OPTIMIZERS:
        if llm not in ("full", "freeze"):
            problems.append(f"`train.optim` {t.optim} (GaLore) projects the gradients of full weights; set "
                            f"`model.trainable.llm` to full or freeze (it is {llm})")
        if not t.optim_target_modules:
            problems.append(f"`train.optim` {t.optim} needs `train.optim_target_modules` (e.g. [attn, mlp])")
        if t.projector_learning_rate is not None:
            problems.append(f"`train.optim` {t.optim} builds its own parameter groups; remove "
                            "`train.projector_learning_rate`")
    elif t.optim_target_modules:
        problems.append("`train.optim_target_modules` is for the GaLore optimizers (train.optim galore_*); remove it")
    return problems


def _qlora_problems(cfg: RunConfig) -> list[str]:
    """QLoRA needs the GPU, and its 4-bit weights cannot be sharded by ZeRO-3 here."""
    problems = []
    if cfg.train.use_cpu:
        problems.append("`model.trainable.llm` qlora needs a CUDA GPU but `train.use_cpu` is true; use lora on a CPU")
    ds = cfg.train.deepspeed
    if ds and Path(ds).is_file():
        import json

        try:
            stage = json.loads(Path(ds).read_text()).get("zero_optimization", {}).get("stage")
        except (ValueError, AttributeError):
            stage = None
        if stage == 3:
            problems.append(f"`model.trainable.llm` qlora with ZeRO-3 ({ds}) is not supported; use "
                            "configs/deepspeed/zero2.json, or lora with ZeRO-3")
    return problems


def _data_problems(cfg: RunConfig, paths: list[str]) -> list[str]:
    """Checks of `data.format`, `data.datasets`, `data.packing` and the template against the stage."""
    problems, d, stage = [], cfg.data, cfg.stage
    valid = STAGE_FORMATS[stage]
    if d.format not in valid:
        problems.append(f"`data.format` {d.format!r} is not read by stage `{stage}` (valid: {', '.join(valid)})")
    if d.datasets and any(paths):
        problems.append("set either `data.path` or `data.datasets`, not both (a path is a dataset entry with weight 1)")
    if d.datasets and cfg.modality != "text":
        problems.append("`data.datasets` mixes text datasets; for pretrain/sft list the files in `data.path`")
    for i, entry in enumerate(d.datasets):
        key = f"data.datasets[{i}]"
        if isinstance(entry, str):  # a bare path: weight 1, data.format
            continue
        if not isinstance(entry, dict):
            problems.append(f"`{key}` must be a mapping like {{path: data.jsonl, weight: 1.0}}, got {entry!r}")
            continue
        for k in entry:
            if k not in DATASET_KEYS:
                hint = did_you_mean(k, DATASET_KEYS, cutoff=0.5)
                problems.append(f"unknown key `{key}.{k}`{hint} (valid keys here: {', '.join(DATASET_KEYS)})")
        if not isinstance(entry.get("path"), str) or not entry.get("path"):
            problems.append(f"`{key}.path` is missing; give a data file or a `datasets` hub name")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            problems.append(f"`{key}.weight` must be a number > 0 (copies per epoch), got {weight!r}")
        if entry.get("format", "auto") not in valid:
            problems.append(f"`{key}.format` {entry.get('format')!r} is not read by stage `{stage}` "
                            f"(valid: {', '.join(valid)})")
        for k in ("split", "subset"):
            if k in entry and not isinstance(entry[k], str):
                problems.append(f"`{key}.{k}` must be a string, got {entry[k]!r}")
    if stage == "text-sft" and d.template == "plain":
        problems.append("stage `text-sft` needs a chat template; set `data.template` to chatml, vicuna_v1 or "
                        "tokenizer (`plain` drops the user's text)")
    return problems


def looks_like_hub_name(path: str) -> bool:
    """True for `owner/name` or `name` without a file suffix (loaded with `datasets.load_dataset`)."""
    return not Path(path).suffix and not Path(path).exists() and path.count("/") <= 1 and " " not in path


def data_file_exists(path: str) -> bool:
    """True for an existing data file, or a LLaMA-Factory entry `DIR/dataset_info.json#NAME` (or `DIR#NAME`) whose
    dataset_info.json exists; the entry itself is checked when the data is read."""
    location, _, entry = path.partition("#")
    if not entry:
        return Path(path).is_file()
    return Path(location).is_file() or (Path(location) / "dataset_info.json").is_file()


def _missing_paths(cfg: RunConfig, data_paths: list[str]) -> list[str]:
    problems = []
    for p in data_paths:
        if p and (Path(p) / "dataset_info.json").is_file() and "#" not in p:
            problems.append(f"`data.path` {p!r} is a LLaMA-Factory dataset folder; name an entry: "
                            f"{p.rstrip('/')}/dataset_info.json#NAME")
        elif p and not data_file_exists(p) and not (cfg.modality == "text" and looks_like_hub_name(p)):
            problems.append(f"`data.path` file {p!r} does not exist")
    if cfg.data.image_root and not Path(cfg.data.image_root).is_dir():
        problems.append(f"`data.image_root` {cfg.data.image_root!r} is not a directory")
    t = cfg.train
    if t.deepspeed and not Path(t.deepspeed).is_file():
        problems.append(f"`train.deepspeed` file {t.deepspeed!r} does not exist; shipped ones: configs/deepspeed/*.json")
    if cfg.model.init_from and not Path(cfg.model.init_from).is_dir():
        problems.append(f"`model.init_from` {cfg.model.init_from!r} is not a directory; give a previous run directory")
    llm = cfg.model.llm
    models = [("llm.name_or_path", llm.name_or_path, "tiny:llm"), ("llm.tokenizer", llm.tokenizer, "")]
    if cfg.modality == "multimodal":
        models.append(("vision.name_or_path", cfg.model.vision.name_or_path, "tiny:vision"))
    for key, location, tiny in models:
        if location and _looks_local(location) and not Path(location).expanduser().exists():
            problems.append(f"`model.{key}` {location!r} does not exist; give a local model directory, a hub id "
                            f"(owner/name){' or ' + tiny if tiny else ''}")
    return problems


def _looks_local(location: str) -> bool:
    """True for what can only be a local path (absolute, ./ ../ ~, or deeper than a hub id's owner/name)."""
    return location.startswith(("/", "./", "../", "~")) or location.count("/") > 1


def config_from_dict(data: dict | None, source: str = "config", check_paths: bool = True) -> RunConfig:
    """Build, default and validate a `RunConfig`; raises `ConfigError` listing every problem."""
    # Type errors make cross-field checks unreliable: they are reported first, on their own.
    cfg = validate_data(RunConfig, data if data is not None else {}, source)
    cfg.resolve_defaults()
    problems = validate(cfg, check_paths)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None, check_paths: bool = True) -> RunConfig:
    """Read a YAML config, apply `key=value` overrides, and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {str(path)!r} does not exist"], str(path))
    data = load_yaml_file(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(["the top level must be a mapping of keys"], str(path))
    apply_overrides(data, overrides or [])
    return config_from_dict(data, str(path), check_paths)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (read back by `load_saved_config`)."""
    Path(path).write_text(dump_yaml(to_dict(cfg)))


def load_saved_config(run_dir: str | Path) -> RunConfig:
    """Read the resolved config a run saved, without re-validating paths that may have moved."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError([f"{path} does not exist; is {run_dir} a llava-kit run directory?"], str(run_dir))
    cfg = validate_data(RunConfig, load_yaml_file(path), str(path))
    cfg.resolve_defaults()
    return cfg
