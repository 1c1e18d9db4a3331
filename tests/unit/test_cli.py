"""lookalike.cli: what reaches the terminal cannot be rewritten by a catalog's ids."""

from lookalike.cli import printable


def test_control_and_bidi_characters_are_escaped_printable_text_is_not():
    hostile = "SKU-1\x1b[2J\x1b[31mred\r\nfake line\u202eevil\u2066x\u2069\u200b\u2028\x7f\x9b"
    shown = printable(hostile)
    assert shown == ("SKU-1\\x1b[2J\\x1b[31mred\\x0d\\x0afake line\\u202eevil\\u2066x\\u2069\\u200b\\u2028"
                     "\\x7f\\x9b")
    assert all(ch.isprintable() for ch in shown)
    for fine in ("shoe-42", "café 中文 😀", "a b/c_d.e"):
        assert printable(fine) == fine


def test_serve_writes_the_search_backend_where_every_load_reads_it_and_index_follows_it(tmp_path, capsys, monkeypatch):
    import shutil

    from lookalike.cli import main, milvus_target
    from lookalike.indexing.model_configs import parameters, read
    from lookalike.indexing.repository import Repository
    from tests.conftest import REPOSITORY

    repo = tmp_path / "repo"
    (repo / "product_search").mkdir(parents=True)
    shutil.copy(REPOSITORY / "product_search" / "config.pbtxt", repo / "product_search" / "config.pbtxt")
    ran = []
    monkeypatch.setattr("lookalike.server.serve.serve_forever", lambda options: ran.append(options) or 0)
    assert main(["serve", "--model-repository", str(repo), "--search-backend", "milvus", "--milvus-uri",
                 "http://127.0.0.1:19530", "--milvus-collection", "shop"]) == 0 and ran
    assert "searches with milvus at http://127.0.0.1:19530" in capsys.readouterr().err
    params = parameters(read(repo / "product_search" / "config.pbtxt"))
    assert (params["search_backend"], params["milvus_uri"], params["milvus_collection"]) == ("milvus", "http://127.0.0.1:19530", "shop")

    import argparse

    plain = argparse.Namespace(search_backend=None, milvus_uri=None, milvus_collection=None, category_partition=False)
    target = milvus_target(plain, Repository(repo))  # `lookalike index` without flags: what serve wrote
    assert target is not None and (target.settings.uri, target.settings.alias, target.partition_key) == \
        ("http://127.0.0.1:19530", "shop", False)
    faiss = argparse.Namespace(search_backend="faiss", milvus_uri=None, milvus_collection=None, category_partition=False)
    assert milvus_target(faiss, Repository(repo)) is None

    assert main(["serve", "--model-repository", str(repo), "--milvus-uri", "http://x:1"]) == 2
    assert "go with --search-backend milvus" in capsys.readouterr().err
    assert main(["serve", "--model-repository", str(repo), "--search-backend", "milvus"]) == 2
    assert "needs --milvus-uri" in capsys.readouterr().err
    (repo / "product_search" / "config.pbtxt").chmod(0o444)
    (repo / "product_search").chmod(0o555)
    try:
        import os

        if os.access(repo / "product_search" / "config.pbtxt", os.W_OK):  # root writes anyway
            return
        assert main(["serve", "--model-repository", str(repo), "--search-backend", "faiss"]) == 1
        assert "read-only" in capsys.readouterr().err
    finally:
        (repo / "product_search").chmod(0o755)
