"""Modality tokenizers: discrete tokens for images, depth, segmentation, text and boxes."""
