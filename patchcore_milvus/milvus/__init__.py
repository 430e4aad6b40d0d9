"""Everything that talks to Milvus, and the only place that imports pymilvus.

- `connection.py`: the client, timeouts, retries, and Milvus' errors turned into ours;
- `rows.py`: one version's collection: schema, rows in and out, search, description rows;
- `versions.py`: `BankStore`, the facade: versions, aliases, publish, rollback, history.

A new search back end goes beside these, behind the same `search(version, vectors, top_k,
params) -> (distances, ids)` that `Bank` calls.
"""

from patchcore_milvus.milvus.rows import BankRows
from patchcore_milvus.milvus.versions import BankInfo, BankStore, VersionInfo, category_of, validate_category

__all__ = ["BankInfo", "BankRows", "BankStore", "VersionInfo", "category_of", "validate_category"]
