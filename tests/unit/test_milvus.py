"""The plain Python of the Milvus backend: expressions, a generation's properties, the settings, the row
layout, writing the backend into product_search's config, and how MilvusIndex behaves when Milvus fails
or the alias names a collection of another embedder (a client that fails on cue stands in for Milvus;
tests/integration/test_milvus_backend.py and test_search_backends.py run the real server)."""

import json
import shutil
import sysconfig

import numpy as np
import pytest

from lookalike.indexing import model_configs
from lookalike.indexing.milvus_index import Timed, catalog_rows, row_pk
from lookalike.server.launcher import shared_libpython_dir
from lookalike.serving.adapter import run_together
from lookalike.serving.filtering import Filter
from lookalike.serving.milvus_search import (
    BackendUnavailableError,
    CollectionMismatchError,
    CollectionState,
    MilvusIndex,
    MilvusRequestError,
    MilvusSettings,
    batches,
    failure_kind,
    filter_expression,
    generation_name,
    generation_of,
    quote,
)
from lookalike.serving.search import UnknownProductError
from lookalike_client import contract as c
from tests.conftest import REPOSITORY


def test_expressions_quote_whatever_a_catalog_holds():
    assert quote('a"b\\c') == '"a\\"b\\\\c"'
    assert quote("a\nb\x00\x7f") == '"a\\u000ab\\u0000\\u007f"'  # a raw newline fails Milvus's parser
    assert filter_expression(Filter()) == ""
    assert filter_expression(Filter("shoes")) == 'category == "shoes"'
    assert filter_expression(Filter("x\"y", frozenset({"b", "a"}))) == 'category == "x\\"y" and product_id not in ["a", "b"]'
    assert filter_expression(Filter(), also_exclude=["self"]) == 'product_id not in ["self"]'


def test_rescoring_runs_cover_every_row_within_milvus_limits():
    wanted = [["a", "b"], [], ["b", "c"], ["d"], [str(i) for i in range(5)]]
    runs = batches(wanted, max_vectors=10, budget=60)
    # every row's products are searched for that row, in runs of at most 60 hits unless one row needs more
    for r, ids in enumerate(wanted):
        assert set(ids) <= {pid for rows, union in runs if r in rows for pid in union}
    assert all(len(rows) * len(union) * 10 <= 60 or len(rows) == 1 for rows, union in runs)
    assert 1 not in {r for rows, _ in runs for r in rows}  # nothing to rescore: no search
    assert batches(wanted, max_vectors=10) == [([0, 2, 3, 4], ["a", "b", "c", "d", "0", "1", "2", "3", "4"])]
    # Milvus's top-k cap (16384 rows of vectors a search): a row wanting more is split
    assert batches([["x", "y", "z"]], max_vectors=8000) == [([0], ["x", "y"]), ([0], ["z"])]


def test_milvus_failures_are_told_apart():
    import grpc
    from pymilvus.exceptions import MilvusException, MilvusUnavailableException, ParamError

    # unreachable, timed out (pymilvus's retries ran out: the code is a grpc status), overloaded: an outage
    assert failure_kind(grpc.RpcError()) == "outage"
    assert failure_kind(ConnectionRefusedError()) == "outage"
    assert failure_kind(MilvusUnavailableException(message="down")) == "outage"
    assert failure_kind(MilvusException(grpc.StatusCode.UNAVAILABLE, "Retry timeout: 2s")) == "outage"
    assert failure_kind(MilvusException(8, "rate limit exceeded")) == "outage"
    # the collection went away under the call (pruned after an alias switch): look the alias up again
    assert failure_kind(MilvusException(100, "collection not found")) == "stale"
    assert failure_kind(MilvusException(101, "collection not loaded")) == "stale"
    # a call Milvus refuses: that request fails, nothing is retried or reconnected
    assert failure_kind(MilvusException(1100, "invalid parameter: cannot parse expression")) == "request"
    assert failure_kind(ParamError(message="limit out of range")) == "request"


def test_the_writer_gives_every_milvus_call_a_whole_second_timeout():
    seen = []

    class Client:
        def describe_alias(self, alias, timeout=None):
            seen.append(timeout)

        def create_schema(self, **kwargs):
            return kwargs

    timed = Timed(Client(), 60)
    timed.describe_alias("a")
    timed.describe_alias("a", timeout=None)  # what aliased() passes when it is given none
    timed.describe_alias("a", timeout=900)
    assert seen == [60, 60, 900] and timed.create_schema() == {}


def test_generation_names_belong_to_their_alias_only():
    assert generation_name("lookalike", 3) == "lookalike_g3"
    assert generation_of("lookalike", "lookalike_g12") == 12
    assert generation_of("lookalike", "lookalike_gx") is None and generation_of("shop", "lookalike_g1") is None
    assert generation_of("lookalike", "lookalike_extra_g1") is None


def test_a_generations_properties_round_trip_and_are_checked():
    state = CollectionState("lookalike_g2", 2, "fp", "lite0", 1280, products=5, max_vectors=10, state_id="s",
                            write_ts=123, kind="hnsw", search={"efSearch": 128})
    assert CollectionState.from_properties(state.name, state.properties()) == state
    assert all(isinstance(v, str) for v in state.properties().values())
    with pytest.raises(CollectionMismatchError, match="not a lookalike index"):
        CollectionState.from_properties("other", {"some": "thing"})


def test_settings_come_from_the_model_parameters_and_the_token_from_the_environment(monkeypatch):
    monkeypatch.setenv(c.MILVUS_TOKEN_ENV, "secret")
    settings = MilvusSettings.from_params({"milvus_uri": "http://m:19530", "milvus_collection": "", "milvus_timeout_s": "2.5"})
    assert (settings.uri, settings.alias, settings.timeout_s, settings.token) == ("http://m:19530", "lookalike", 2.5, "secret")
    assert settings.deadline == 3 and "secret" not in repr(settings)
    with pytest.raises(ValueError, match="milvus_uri"):
        MilvusSettings.from_params({"milvus_uri": " "})


def test_rows_have_one_key_per_product_image_and_view():
    vectors = np.eye(3, 4, dtype=np.float32)
    rows = catalog_rows([("p", "c", [("a.jpg", "sha-a", vectors[:2]), ("b.jpg", "sha-b", vectors[2:])]),
                         ("q" * 1024, "", [("c.jpg", "sha-c", vectors[:1])])])
    assert [r.pk for r in rows[:3]] == [row_pk("p", 0, 0), row_pk("p", 0, 1), row_pk("p", 1, 0)]
    assert [r.vectors for r in rows] == [3, 3, 3, 1] and len({r.pk for r in rows}) == 4
    assert max(len(r.pk) for r in rows) <= 80  # the pk field's max_length, whatever the id's length
    record = rows[0].record()
    assert record["vector"] == [1.0, 0.0, 0.0, 0.0] and record["sha256"] == "sha-a"


def test_serve_writes_the_backend_into_the_config_keeping_its_comments(tmp_path):
    config = tmp_path / "config.pbtxt"
    shutil.copy(REPOSITORY / "product_search" / "config.pbtxt", config)
    before = config.read_text()
    values = model_configs.search_backend_parameters("milvus", "http://127.0.0.1:19530", "shop_a")
    assert model_configs.write_parameters(config, values) is True
    params = model_configs.parameters(model_configs.read(config))
    assert {k: params[k] for k in values} == values and params["device"] == "auto"
    assert config.read_text().count("#") == before.count("#")  # the comments stay
    assert model_configs.write_parameters(config, values) is False  # unchanged: not written (read-only is fine)
    assert model_configs.write_parameters(config, {"search_backend": "faiss"}) is True
    assert model_configs.parameters(model_configs.read(config))["milvus_uri"] == "http://127.0.0.1:19530"


@pytest.mark.parametrize("args, message", [
    (("milvus", None, None), "needs --milvus-uri"),
    (("milvus", "milvus:19530", None), "must be a URL"),
    (("milvus", "http://user:pw@m:19530", None), "must not carry credentials"),
    (("milvus", 'http://m:19530" }', None), "must be a URL"),
    (("milvus", "http://m:19530", "bad-name"), "collection name"),
    (("elastic", None, None), "must be one of"),
])
def test_backend_settings_are_checked_before_anything_is_written(args, message):
    with pytest.raises(ValueError, match=message):
        model_configs.search_backend_parameters(*args)


def test_a_request_can_fail_alone_inside_a_batch_and_a_dependency_outage_is_unavailable():
    def compute(parsed):
        return [UnknownProductError("unknown product id 'x'") if p == "bad" else {"OUT": np.zeros(1)} for p in parsed]

    outcomes = run_together([{"k": None}] * 3, parse=lambda _: "ok", compute=compute, what="search")
    assert all(o.outputs is not None for o in outcomes)
    parsed = iter(["ok", "bad", "ok"])
    outcomes = run_together([{}] * 3, parse=lambda _: next(parsed), compute=compute, what="search")
    assert [o.error is None for o in outcomes] == [True, False, True] and outcomes[1].invalid

    def down(_parsed):
        raise BackendUnavailableError("milvus at http://m is unavailable")

    outcomes = run_together([{}] * 2, parse=lambda _: "ok", compute=down, what="search",
                            unavailable=(BackendUnavailableError,))
    assert all(o.unavailable and "milvus at http://m" in o.error for o in outcomes)
    outcomes = run_together([{}], parse=lambda _: "ok", compute=down, what="search")
    assert not outcomes[0].unavailable and outcomes[0].error  # not declared: an internal error


class FlakyMilvus:
    """Answers describe_alias / describe_collection / load_collection from a dict, or fails on cue."""

    def __init__(self, collections: dict[str, CollectionState], alias: str | None) -> None:
        self.collections, self.alias, self.down, self.closed = collections, alias, False, 0

    def _check(self):
        if self.down:
            raise ConnectionError("Fail connecting to server")

    def describe_alias(self, alias, timeout=None):
        self._check()
        if self.alias is None:
            raise RuntimeError("alias not found[database=default][alias=lookalike]")
        return {"alias": alias, "collection_name": self.alias}

    def describe_collection(self, name, timeout=None):
        self._check()
        return {"properties": self.collections[name].properties()}

    def load_collection(self, name, timeout=None):
        self._check()

    def close(self):
        self.closed += 1


def state(name: str, generation: int, fingerprint: str = "fp") -> CollectionState:
    return CollectionState(name, generation, fingerprint, "lite0", 8, products=3, state_id=f"s{generation}")


def test_an_unreachable_milvus_is_unavailable_retried_with_backoff_and_recovered():
    fake = FlakyMilvus({"lookalike_g1": state("lookalike_g1", 1)}, "lookalike_g1")
    connects = []

    def factory(settings):
        connects.append(settings.uri)
        if fake.down:
            raise BackendUnavailableError("milvus at http://m is unavailable: cannot connect")
        return fake

    index = MilvusIndex(MilvusSettings("http://m"), "fp", "lite0", 8, client_factory=factory, refresh_s=0.0)
    assert index.info()["version"] == 1 and index.info()["backend"] == "milvus"
    fake.down = True
    with pytest.raises(BackendUnavailableError):
        index.state()
    assert fake.closed == 1  # the broken client is dropped
    for _ in range(5):  # within the backoff: no connection attempt, an immediate UNAVAILABLE
        with pytest.raises(BackendUnavailableError, match="unavailable"):
            index.state()
    assert len(connects) == 1
    fake.down = False
    index._client_at -= 10  # the backoff has passed
    assert index.state().generation == 1 and index.last_error is None and len(connects) == 2


def test_a_refused_call_keeps_the_connection_and_a_vanished_collection_is_looked_up_again():
    from pymilvus.exceptions import MilvusException

    fake = FlakyMilvus({"lookalike_g1": state("lookalike_g1", 1), "lookalike_g2": state("lookalike_g2", 2)}, "lookalike_g1")
    index = MilvusIndex(MilvusSettings("http://m"), "fp", "lite0", 8, client_factory=lambda _s: fake, refresh_s=60.0)
    assert index.state().generation == 1

    def refuse(_client):
        raise MilvusException(1100, "invalid parameter")
    with pytest.raises(MilvusRequestError, match="refused"):
        index._call(refuse)
    assert fake.closed == 0 and index.last_error is None  # not an outage: no reconnect, no backoff
    fake.alias = "lookalike_g2"  # the alias moved and generation 1 was pruned before the refresh

    def gone(_client):
        raise MilvusException(100, "collection not found[collection=lookalike_g1]")
    with pytest.raises(BackendUnavailableError):
        index._call(gone)  # UNAVAILABLE: the SDK retries, and the retry finds the new generation
    assert fake.closed == 0 and index.state().generation == 2


def test_a_collection_of_another_embedder_is_never_served():
    logged = []
    fake = FlakyMilvus({"lookalike_g1": state("lookalike_g1", 1), "lookalike_g2": state("lookalike_g2", 2, "other")},
                       "lookalike_g2")
    index = MilvusIndex(MilvusSettings("http://m"), "fp", "lite0", 8, client_factory=lambda _s: fake,
                        log_error=logged.append, refresh_s=0.0)
    assert index.state() is None and index.info()["version"] == 0 and "other" in index.refusal
    assert len(logged) == 1 and "serving no products until then" in logged[0]
    fake.alias = "lookalike_g1"
    assert index.state().generation == 1 and index.refusal is None
    fake.collections["lookalike_g3"] = state("lookalike_g3", 3, "third")
    fake.alias = "lookalike_g3"  # moved to another embedder's: the previous keeps serving
    assert index.state().generation == 1 and len(logged) == 2 and "still serving lookalike_g1" in logged[1]
    assert index.state().generation == 1 and len(logged) == 2  # said once
    fake.alias = None
    assert index.state() is None and index.info() == {**index.info(), "version": 0, "products": 0, "index_id": ""}


def test_the_launcher_puts_this_interpreters_shared_libpython_first():
    directory = shared_libpython_dir()
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        assert directory is None
    else:
        assert directory == sysconfig.get_config_var("LIBDIR")
        from lookalike.server.launcher import find_tritonserver

        binary = find_tritonserver()
        if binary.env:  # the wheel's tritonserver (not one on PATH)
            assert binary.env["LD_LIBRARY_PATH"].split(":")[0] == directory


def test_index_info_of_both_backends_has_the_contracts_fields():
    fake = FlakyMilvus({"lookalike_g1": state("lookalike_g1", 1)}, "lookalike_g1")
    info = MilvusIndex(MilvusSettings("http://m"), "fp", "lite0", 8, client_factory=lambda _s: fake).info()
    assert tuple(info) == c.INDEX_INFO_FIELDS and json.loads(json.dumps(info)) == info
