"""Packing: many short examples -> few fixed-length blocks, no padding inside, no token lost.

    blocks = pack_examples(examples, block_size=2048, split_documents=True)

Each example is (input_ids, labels) and, for text-pt, already ends with EOS, so documents inside a block
stay separated by EOS. `position_ids` restart at 0 at every example start; the collator then sends
no attention mask (and use_cache=False), and transformers builds a block-diagonal causal mask from the restarting positions
(`masking_utils.find_packed_sequence_indices`), so one document never attends to another.

- `split_documents=True` (text-pt): examples are laid end to end and cut every `block_size` tokens;
  a long document continues in the next block. Every token of every example appears exactly once.
- `split_documents=False` (text-sft): whole examples are placed greedily, a new block is started when
  the next example does not fit; an answer is never separated from its question.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from llava_kit.data.encode import IGNORE_INDEX


@dataclass
class PackedBlock:
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)

    def add(self, ids: list[int], labels: list[int], document_start: bool = True) -> None:
        self.input_ids += ids
        # The loss shifts labels by one: a document's first label would be "predicted" from the previous
        # document's last token. Unpacked, that label is never used; packed, it is ignored to stay equivalent.
        self.labels += ([IGNORE_INDEX] + labels[1:]) if document_start and labels else labels
        self.position_ids += range(len(ids))

    def __len__(self) -> int:
        return len(self.input_ids)


def pack_examples(examples: list[tuple[list[int], list[int]]], block_size: int,
                  split_documents: bool = True) -> list[PackedBlock]:
    """Pack examples in the given order into blocks of at most `block_size` tokens (all full but the last
    when `split_documents`)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    blocks = [PackedBlock()]
    for ids, labels in examples:
        if split_documents:
            start = 0
            while start < len(ids):
                room = block_size - len(blocks[-1])
                if room == 0:
                    blocks.append(PackedBlock())
                    room = block_size
                # a document cut at a block end continues at position 0 in the next block (a fresh row)
                blocks[-1].add(ids[start:start + room], labels[start:start + room], document_start=start == 0)
                start += room
            continue
        if len(ids) > block_size:
            raise ValueError(f"an example of {len(ids)} tokens does not fit a block of {block_size}; "
                             "encode with max_seq_len <= block_size")
        if len(blocks[-1]) + len(ids) > block_size:
            blocks.append(PackedBlock())
        blocks[-1].add(ids, labels)
    return [b for b in blocks if len(b)]


@dataclass
class PackedCollator:
    """Stacks packed blocks: input_ids, labels and restarting position_ids, no attention mask, no KV cache.

    Without an attention mask, transformers reads document boundaries from the position_ids. The
    (only) shorter last block is padded with pad tokens that form their own ignored "document".
    """

    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict:
        longest = max(len(i["input_ids"]) for i in items)
        input_ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)  # [batch, seq]
        labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.arange(longest).repeat(len(items), 1)  # pads count 0, 1, ... as a separate document
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = item["input_ids"]
            labels[row, :n] = item["labels"]
            position_ids[row, :n] = item["position_ids"]
            position_ids[row, n:] = torch.arange(longest - n)
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                 # use_cache=False: with a KV cache object present transformers skips the packed-sequence mask
                 "use_cache": False}
        # images of a multimodal block, in token order (AnyRes: also their sizes and caps)
        for key in ("pixel_values", "vision_features", "image_sizes", "image_token_caps"):
            images = [i[key] for i in items if key in i]
            if images:
                batch[key] = torch.cat(images)  # [total_images, ...]
        return batch


class PackedLlavaDataset(Dataset):
    """Whole multimodal samples packed into blocks of `block_size` tokens, with their images in order.

    The samples are shuffled once (seeded) and placed greedily; an image's tokens and a sample's answer
    are never split. `__getitem__` returns one block: input_ids, labels, restarting position_ids and the
    concatenated `pixel_values` or `vision_features` of its samples.
    """

    def __init__(self, dataset, block_size: int, seed: int = 0):
        self.dataset = dataset
        self.report = dataset.report
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
        self.blocks: list[list[int]] = [[]]
        used = 0
        for index in order:
            n = len(dataset.examples[index].input_ids)
            if used + n > block_size and self.blocks[-1]:
                self.blocks.append([])
                used = 0
            self.blocks[-1].append(index)
            used += n

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict:
        block = PackedBlock()
        images: dict[str, list[torch.Tensor]] = {}
        for member in self.blocks[index]:
            item = self.dataset.item(member)
            if item is None:  # an image failed to decode during training: reported, the block goes on without it
                continue
            block.add(item["input_ids"].tolist(), item["labels"].tolist())
            for key in ("pixel_values", "vision_features", "image_sizes", "image_token_caps"):
                if key in item:
                    images.setdefault(key, []).append(item[key])
        packed = {"input_ids": torch.tensor(block.input_ids), "labels": torch.tensor(block.labels),
                  "position_ids": torch.tensor(block.position_ids)}
        packed.update({key: torch.cat(parts) for key, parts in images.items()})
        return packed
