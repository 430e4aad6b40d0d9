"""A bank copied vector for vector into another Milvus (for benchmarks that compare Milvus setups)."""

from __future__ import annotations

from patchcore_milvus.config import Config
from patchcore_milvus.milvus import BankStore


def copy_bank(source: BankStore, version: str, target: BankStore, config: Config) -> str:
    """`version` of `source` as the current bottle bank of `target`, verified; returns the new collection."""
    rows = source.read_rows(version)
    collection = target.create_version("bottle", rows.vectors.shape[1])
    target.insert(collection, rows)
    target.build_index(collection, config.index_type, config.effective_index_params)
    description = source.read_description(version)
    if description.extractor_model is not None:
        target.write_model(collection, source.read_model(version))
    target.write_description(collection, description)
    target.verify(collection, len(rows), probe_id=0, search_params=config.effective_search_params)
    target.publish("bottle", collection, keep=1)
    return collection
