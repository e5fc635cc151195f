"""Readers, layouts, embedded datasets, shard writer and the streaming reader."""
