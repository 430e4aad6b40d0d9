"""A Milvus search read as arrays, without one Python object per hit.

`MilvusClient.search` packs each query vector with `struct.pack` and unpacks the answer into one
`Hit` per result: for a station's 1,024 patches per image that is about 40 µs per query vector on
the client, Lite or server alike (pymilvus issue #3213 asks for a columnar result; there is no
public one). Here pymilvus still builds the request (consistency, partitions, parameters), the
query vectors go in as the bytes of the numpy array and the ids and distances come back as numpy
arrays read from the response message. Where this pymilvus lacks the internals it relies on,
`columnar_search` returns None and the caller uses `MilvusClient.search`.
"""

from __future__ import annotations

import logging

import numpy as np
from pymilvus import MilvusClient

from patchcore_milvus.errors import StoreError

try:
    from pymilvus.client import ts_utils
    from pymilvus.client.call_context import _api_level_md
    from pymilvus.client.prepare import Prepare
    from pymilvus.client.utils import check_status
    from pymilvus.grpc_gen import common_pb2
except ImportError:  # another pymilvus layout: the public search is used
    Prepare = None

log = logging.getLogger("patchcore_milvus.milvus")
_FLOAT_VECTOR = common_pb2.PlaceholderType.FloatVector if Prepare is not None else None


def columnar_search(
    client: MilvusClient,
    collection: str,
    vectors: np.ndarray,
    top_k: int,
    search_params: dict,
    anns_field: str,
    partition: str,
    pk_field: str,
    timeout: float,
) -> tuple[np.ndarray, np.ndarray] | None:
    """(squared L2 distances, ids) of each vector's `top_k` nearest rows, each (n, top_k), inf
    and -1 where Milvus found fewer; None where this pymilvus cannot be driven this way.

    Only the primary key `pk_field` is asked for: with no output fields Milvus Lite returns every
    scalar field of every hit."""
    if Prepare is None:
        return None
    try:
        handler = client._get_connection()
        context = client._generate_call_context()
        stub = handler._stub
        consistency: dict = {}
        default_consistency = ts_utils.construct_guarantee_ts(
            collection, consistency, handler.server_address, context.get_db_name()
        )
        request = Prepare.search_requests_with_expr(
            collection_name=collection,
            anns_field=anns_field,
            param={"metric_type": "L2", "params": search_params},
            limit=top_k,
            data=[vectors[0]],
            partition_names=[partition],
            output_fields=[pk_field],
            use_default_consistency=default_consistency,
            **consistency,
        )
    except (AttributeError, TypeError) as exc:
        log.debug("columnar search unavailable with this pymilvus (%s); using MilvusClient.search", exc)
        return None
    rows = np.ascontiguousarray(vectors, dtype="<f4")
    placeholder = common_pb2.PlaceholderValue(tag="$0", type=_FLOAT_VECTOR, values=[row.tobytes() for row in rows])
    request.placeholder_group = common_pb2.PlaceholderGroup(placeholders=[placeholder]).SerializeToString()
    request.nq = len(rows)
    response = stub.Search(request, timeout=timeout, metadata=_api_level_md(context))
    check_status(response.status)
    result = response.results
    found = np.asarray(result.topks, dtype=np.int64)
    if len(found) != len(rows) or (found > top_k).any():
        raise StoreError(f"Milvus answered {len(found)} queries of {len(rows)}, up to {found.max(initial=0)} hits each")
    squared = np.full((len(rows), top_k), np.inf, dtype=np.float32)
    ids = np.full((len(rows), top_k), -1, dtype=np.int64)
    query = np.repeat(np.arange(len(rows)), found)
    rank = np.arange(len(query)) - np.repeat(np.cumsum(found) - found, found)
    squared[query, rank] = np.asarray(result.scores, dtype=np.float32)
    ids[query, rank] = np.asarray(result.ids.int_id.data, dtype=np.int64)
    return squared, ids
