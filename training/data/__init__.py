"""Datasets: synthetic shapes, webdataset shards, converters, readers."""
