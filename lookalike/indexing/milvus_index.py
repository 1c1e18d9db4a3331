"""`lookalike index --search-backend milvus`: writing a catalog's embeddings into Milvus, as plain Python
(the served side, and the layout of a collection, are `lookalike.serving.milvus_search`'s).

- A full build (no collection yet, a new embedder, `--full`, another index type) fills a new generation
  `<alias>_g<N>`: rows inserted, flushed, indexed, loaded, its properties written last; then the alias
  moves to it in one step. Older generations are kept for `--rollback` (`keep` of them in all).
- Otherwise the change is incremental, in the live generation: rows of new or changed images upserted,
  rows of removed images and products deleted, then the properties (product count, state id, the
  Milvus timestamp of the last write, which servers search at: read-your-own-writes).
- A collection records its embedder's fingerprint; writing into one of another embedder is refused.
- Images whose sha256 the live generation holds are not embedded again (`MilvusEmbeddingStore`).
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from lookalike.indexing.repository import KEEP_VERSIONS
from lookalike.serving.milvus_search import (
    CATEGORY,
    IMAGE,
    INDEX_TYPES,
    MAX_CATEGORY_BYTES,
    MAX_ID_BYTES,
    MAX_IMAGE_BYTES,
    PK,
    PRODUCT_ID,
    SHA256,
    VECTOR,
    VECTORS,
    BackendUnavailableError,
    CollectionMismatchError,
    CollectionState,
    MilvusSettings,
    aliased,
    connection_alias,
    generation_name,
    generation_of,
    quote,
    read_state,
)

INSERT_ROWS = 1000  # rows a write call (1280-d: about 5 MB)
QUERY_CHUNK = 256  # values of one `in [...]` expression
PARTITIONS = 16  # partitions of the category partition key
INDEX_WAIT_S = 600.0
# Whole seconds (pymilvus's retry loop ignores a float timeout, and with none retries an unreachable
# server 75 times, about 3.5 minutes): each call of `lookalike index`, and loading a generation.
CALL_TIMEOUT_S = 60
LOAD_TIMEOUT_S = 900


class MilvusIndexError(RuntimeError):
    """Milvus refused a write, or the servers did not confirm what was written."""


@dataclass(frozen=True)
class Row:
    pk: str
    product_id: str
    category: str
    image: str
    sha256: str
    vectors: int  # the product's vector count (all its images)
    vector: np.ndarray

    def record(self) -> dict[str, Any]:
        return {PK: self.pk, PRODUCT_ID: self.product_id, CATEGORY: self.category, IMAGE: self.image,
                SHA256: self.sha256, VECTORS: self.vectors, VECTOR: self.vector.astype(np.float32).tolist()}

    def key(self) -> tuple[str, str, str, str, int]:
        """What a stored row must equal for it to be left alone."""
        return (self.product_id, self.category, self.image, self.sha256, self.vectors)


def row_pk(product_id: str, image: int, view: int) -> str:
    """A row's primary key: the product (hashed: ids are up to 1,024 characters), its image, the view."""
    return f"{hashlib.sha256(product_id.encode('utf-8')).hexdigest()[:32]}:{image}:{view}"


def catalog_rows(products: Sequence[tuple[str, str, Sequence[tuple[str, str, np.ndarray]]]]) -> list[Row]:
    """Rows of (product id, category, [(image path, sha256, [views, D] vectors), ...]) products."""
    rows = []
    for product_id, category, images in products:
        count = sum(len(block) for _, _, block in images)
        for i, (image, sha, block) in enumerate(images):
            for v, vector in enumerate(block):
                rows.append(Row(row_pk(product_id, i, v), product_id, category, image, sha, count, vector))
    return rows


@dataclass
class MilvusReport:
    generation: int
    state_id: str
    products: int
    full: bool  # a new generation (else an incremental change in the live one)
    upserted: int = 0
    deleted: int = 0
    dropped: list[int] = field(default_factory=list)
    write_ts: int = 0


def _schema(client: Any, dim: int, partition_key: bool, description: str) -> Any:
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False, description=description)
    schema.add_field(PK, DataType.VARCHAR, is_primary=True, max_length=80)
    schema.add_field(PRODUCT_ID, DataType.VARCHAR, max_length=MAX_ID_BYTES)
    schema.add_field(CATEGORY, DataType.VARCHAR, max_length=MAX_CATEGORY_BYTES, is_partition_key=partition_key)
    schema.add_field(IMAGE, DataType.VARCHAR, max_length=MAX_IMAGE_BYTES)
    schema.add_field(SHA256, DataType.VARCHAR, max_length=64)
    schema.add_field(VECTORS, DataType.INT32)
    schema.add_field(VECTOR, DataType.FLOAT_VECTOR, dim=dim)
    return schema


def _index_params(client: Any, kind: str, build: dict[str, int]) -> Any:
    params = client.prepare_index_params()
    if kind not in INDEX_TYPES:
        raise ValueError(f"the Milvus backend builds {', '.join(INDEX_TYPES)} indexes, not {kind}")
    extra: dict[str, int] = {}
    if kind == "hnsw":
        extra = {"M": int(build.get("M", 32)), "efConstruction": int(build.get("efConstruction", 200))}
    elif kind == "ivf-pq":
        extra = {"nlist": int(build.get("nlist", 1024)), "m": int(build.get("m", 16)), "nbits": 8}
    params.add_index(field_name=VECTOR, index_type=INDEX_TYPES[kind], metric_type="IP", params=extra)
    params.add_index(field_name=PRODUCT_ID, index_type="Trie")  # `product_id in [...]` lookups
    return params


class Timed:
    """A MilvusClient whose calls carry `timeout_s` unless they name a timeout of their own (not None)."""

    UNTIMED = frozenset({"create_schema", "prepare_index_params", "close"})

    def __init__(self, client: Any, timeout_s: int) -> None:
        self._client, self._timeout_s = client, timeout_s

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute) or name in self.UNTIMED:
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("timeout") is None:
                kwargs["timeout"] = self._timeout_s
            return attribute(*args, **kwargs)
        return call


class MilvusWriter:
    """The writes of one `lookalike index` run (pymilvus's MilvusClient for the collection and alias
    operations, its ORM Collection for the data writes, whose results carry the Milvus timestamp)."""

    def __init__(self, settings: MilvusSettings, log: Callable[[str], None] = print) -> None:
        from pymilvus import MilvusClient, connections

        self.settings = settings
        self.log = log
        self.client = Timed(MilvusClient(uri=settings.uri, token=settings.token, timeout=float(CALL_TIMEOUT_S),
                                         alias=connection_alias()), CALL_TIMEOUT_S)
        self._orm = connection_alias()
        connections.connect(alias=self._orm, uri=settings.uri, token=settings.token, timeout=float(CALL_TIMEOUT_S))

    def close(self) -> None:
        from pymilvus import connections

        try:
            connections.disconnect(self._orm)
        finally:
            self.client.close()

    def __enter__(self) -> "MilvusWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------------------------
    def live(self) -> CollectionState | None:
        name = aliased(self.client, self.settings.alias)
        return read_state(self.client, name) if name is not None else None

    def generations(self) -> dict[int, CollectionState | None]:
        """Every generation of this alias (None: a collection of that name that is not a lookalike index)."""
        found: dict[int, CollectionState | None] = {}
        for name in self.client.list_collections():
            generation = generation_of(self.settings.alias, str(name))
            if generation is None:
                continue
            try:
                found[generation] = read_state(self.client, str(name))
            except (CollectionMismatchError, BackendUnavailableError):
                found[generation] = None
        return found

    def _query(self, name: str, expr: str, fields: list[str], limit: int, strong: bool = True) -> list[dict[str, Any]]:
        return list(self.client.query(name, filter=expr, output_fields=fields, limit=limit,
                                      consistency_level="Strong" if strong else "Bounded"))

    def stored_rows(self, state: CollectionState) -> dict[str, tuple[str, str, str, str, int]]:
        """pk -> Row.key() of every row of a generation (no vectors), read with an iterator."""
        out: dict[str, tuple[str, str, str, str, int]] = {}
        iterator = self.client.query_iterator(state.name, batch_size=4096, filter="",
                                              output_fields=[PK, PRODUCT_ID, CATEGORY, IMAGE, SHA256, VECTORS],
                                              consistency_level="Strong")
        try:
            while True:
                batch = iterator.next()
                if not batch:
                    break
                for row in batch:
                    out[str(row[PK])] = (str(row[PRODUCT_ID]), str(row[CATEGORY]), str(row[IMAGE]), str(row[SHA256]),
                                         int(row[VECTORS]))
        finally:
            iterator.close()
        return out

    def embeddings_of(self, state: CollectionState, hashes: Iterable[str]) -> dict[str, np.ndarray]:
        """sha256 -> that image's stored [views, D] vectors, for the hashes the generation holds."""
        wanted = sorted(set(h for h in hashes if h))
        found: dict[str, dict[str, list[tuple[int, list[float]]]]] = {}
        for start in range(0, len(wanted), QUERY_CHUNK):
            chunk = wanted[start:start + QUERY_CHUNK]
            expr = f"{SHA256} in [{', '.join(quote(h) for h in chunk)}]"
            for row in self._query(state.name, expr, [PK, SHA256, VECTOR], limit=16384, strong=False):
                owner, _, view = str(row[PK]).rpartition(":")
                found.setdefault(str(row[SHA256]), {}).setdefault(owner, []).append((int(view), row[VECTOR]))
        out = {}
        for sha, owners in found.items():
            views = sorted(owners[min(owners)])  # one image's rows (the same file may be in several products)
            if [v for v, _ in views] == list(range(len(views))):
                out[sha] = np.asarray([vector for _, vector in views], dtype=np.float32)
        return out

    # -- writing ---------------------------------------------------------------------------------------
    def _collection(self, name: str) -> Any:
        from pymilvus import Collection

        return Collection(name, using=self._orm)

    def _write(self, name: str, rows: Sequence[Row], deletes: Sequence[str], *, insert: bool) -> int:
        """Inserts (a new generation) or upserts rows, then deletes pks; returns the last write's timestamp."""
        collection = self._collection(name)
        ts = 0
        for start in range(0, len(rows), INSERT_ROWS):
            batch = [r.record() for r in rows[start:start + INSERT_ROWS]]
            write = collection.insert if insert else collection.upsert
            result = write(batch, timeout=CALL_TIMEOUT_S)
            ts = max(ts, int(result.timestamp))
        for start in range(0, len(deletes), QUERY_CHUNK):
            chunk = deletes[start:start + QUERY_CHUNK]
            result = collection.delete(f"{PK} in [{', '.join(quote(pk) for pk in chunk)}]", timeout=CALL_TIMEOUT_S)
            ts = max(ts, int(result.timestamp))
        return ts

    def _wait_indexed(self, name: str, rows: int) -> None:
        deadline = time.monotonic() + INDEX_WAIT_S
        while True:
            info = self.client.describe_index(name, index_name=VECTOR)
            pending = int(info.get("pending_index_rows", 0) or 0)
            if int(info.get("indexed_rows", 0) or 0) >= rows and pending == 0 or rows == 0:
                return
            if time.monotonic() > deadline:
                raise MilvusIndexError(f"Milvus did not finish indexing {name} within {INDEX_WAIT_S:.0f} s "
                                       f"({info.get('indexed_rows')} of {rows} rows indexed)")
            time.sleep(0.5)

    def build_generation(self, rows: Sequence[Row], *, fingerprint: str, embedder_model: str, dim: int, kind: str,
                         build: dict[str, int], search: dict[str, int], partition_key: bool = False) -> MilvusReport:
        """A new generation holding `rows`, indexed and loaded, its properties written last; the alias
        then moves to it (created when there is none)."""
        existing = self.generations()
        generation = max(existing, default=0) + 1
        name = generation_name(self.settings.alias, generation)
        state = CollectionState(name=name, generation=generation, fingerprint=fingerprint, embedder_model=embedder_model,
                                dim=dim, products=len({r.product_id for r in rows}),
                                max_vectors=max((r.vectors for r in rows), default=1), state_id=uuid.uuid4().hex,
                                kind=kind, search=dict(search))
        description = f"lookalike index generation {generation} of alias {self.settings.alias} ({embedder_model})"
        extra: dict[str, Any] = {"num_partitions": PARTITIONS} if partition_key else {}
        self.client.create_collection(name, schema=_schema(self.client, dim, partition_key, description),
                                      index_params=_index_params(self.client, kind, build), consistency_level="Bounded", **extra)
        try:
            ts = self._write(name, rows, [], insert=True)
            self._collection(name).flush(timeout=CALL_TIMEOUT_S)
            self._wait_indexed(name, len(rows))
            self.client.load_collection(name, timeout=LOAD_TIMEOUT_S)
            state = replace(state, write_ts=ts)
            self.client.alter_collection_properties(name, properties=state.properties())
        except BaseException:
            self.client.drop_collection(name)  # never left half-built under a generation number
            raise
        self._point_alias(name)
        return MilvusReport(generation, state.state_id, state.products, True, upserted=len(rows), write_ts=ts)

    def _point_alias(self, name: str) -> None:
        if aliased(self.client, self.settings.alias) is None:
            self.client.create_alias(name, self.settings.alias)
        else:
            self.client.alter_alias(name, self.settings.alias)

    def update_live(self, state: CollectionState, rows: Sequence[Row], fingerprint: str) -> MilvusReport:
        """Makes the live generation hold exactly `rows`: upserts new and changed rows, deletes the rest.
        Refuses (CollectionMismatchError) a generation of another embedder than `fingerprint`'s."""
        if state.fingerprint != fingerprint:
            raise CollectionMismatchError(f"collection {state.name} holds embeddings of embedder {state.embedder_model} "
                                          f"{state.fingerprint}, not {fingerprint}: a new generation is built instead")
        if rows and state.dim != len(rows[0].vector):
            raise CollectionMismatchError(f"collection {state.name} holds {state.dim}-d vectors, not {len(rows[0].vector)}-d")
        stored = self.stored_rows(state)
        wanted = {r.pk: r for r in rows}
        changed = [r for r in rows if stored.get(r.pk) != r.key()]
        gone = sorted(pk for pk in stored if pk not in wanted)
        ts = self._write(state.name, changed, gone, insert=False) if changed or gone else state.write_ts
        fresh = replace(state, products=len({r.product_id for r in rows}),
                        max_vectors=max((r.vectors for r in rows), default=1),
                        state_id=uuid.uuid4().hex if changed or gone else state.state_id, write_ts=ts)
        if fresh != state:
            self.client.alter_collection_properties(state.name, properties=fresh.properties())
        return MilvusReport(state.generation, fresh.state_id, fresh.products, False, upserted=len(changed),
                            deleted=len(gone), write_ts=ts)

    def prune(self, keep: int, protect: Iterable[int] = ()) -> list[int]:
        """Drops all but the newest `keep` generations, never the aliased one or `protect`ed ones."""
        live = aliased(self.client, self.settings.alias)
        generations = sorted(self.generations())
        dropped = []
        for generation in generations[:-keep] if keep > 0 else generations:
            name = generation_name(self.settings.alias, generation)
            if name == live or generation in set(protect):
                continue
            self.client.drop_collection(name)
            dropped.append(generation)
        return dropped

    def rollback(self) -> tuple[int, int]:
        """The alias back to the newest earlier generation of the same embedder (the current one is
        marked rejected, so that no later run serves or reuses it). Returns (from, to)."""
        live = self.live()
        if live is None:
            raise MilvusIndexError(f"alias {self.settings.alias} names no collection: nothing to roll back")
        earlier = [s for g, s in sorted(self.generations().items())
                   if g < live.generation and s is not None and not s.rejected and s.fingerprint == live.fingerprint]
        if not earlier:
            raise MilvusIndexError(f"no earlier generation of this embedder to roll back to from {live.name} "
                                   f"(`lookalike index` keeps the newest {KEEP_VERSIONS} unless --keep-versions says otherwise)")
        target = earlier[-1]
        self.client.load_collection(target.name, timeout=LOAD_TIMEOUT_S)
        self._point_alias(target.name)
        self.client.alter_collection_properties(
            live.name, properties={"lookalike.rejected": f"rolled back to generation {target.generation}"})
        return live.generation, target.generation
