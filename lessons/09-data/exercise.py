"""Lesson 09 exercises: labels for the loss, truncation that keeps images whole, batching.

Run `pytest lessons/09-data` to grade your code (`--reference` grades minimind_v instead).
"""
from __future__ import annotations

import torch

REFERENCE = {
    "truncate": "minimind_v.data:truncate",
    "encode_sample": "minimind_v.data:encode_sample",
    "collate": "minimind_v.data:collate",
}


def truncate(ids: list[int], target: list[bool], max_length: int, image_pad_id: int,
             num_patches: int) -> tuple[list[int], list[bool], int]:
    """Cut `ids` and `target` to at most `max_length`, never through an image.

    Every image is a run of exactly `num_patches` copies of `image_pad_id` (two adjacent images
    make a run twice as long). If the cut would keep only part of an image, cut before that image.
    Returns (ids, target, number of whole images kept).
    """
    raise NotImplementedError


def encode_sample(tokenizer, messages: list[dict], max_length: int,
                  num_patches: int) -> tuple[list[int], list[int], int]:
    """Messages -> (input_ids, labels, images kept).

    Use `tokenizer.encode_conversation(messages, num_patches)` -> (ids, is_target), then
    `truncate`. labels[t] = ids[t] where is_target[t] (assistant content and its <|im_end|>),
    else -100. Labels are not shifted.
    """
    raise NotImplementedError


def collate(batch: list[dict], pad_id: int = 0) -> dict:
    """Items {input_ids (T,), labels (T,), pixel_values (N,3,S,S), image_paths} -> a batch:

    input_ids (B, Tmax) right-padded with pad_id; labels (B, Tmax) padded with -100;
    attention_mask (B, Tmax) bool, True on real tokens; pixel_values (B, Nmax, 3, S, S)
    zero-padded; image_counts (B,) long; image_paths: the B lists.
    """
    raise NotImplementedError
