"""lookalike.cli explains itself: every flag has help with its default, renamed flags keep their old
spelling (deprecated), --version, info and health fail cleanly, and `lookalike` never imports
`lookalike_export` (export and engine come through the `lookalike.commands` entry points)."""

from __future__ import annotations

import argparse
import ast
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lookalike import cli

ROOT = Path(__file__).resolve().parents[2]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return cli.build_parser()[0]


def test_every_command_is_there_in_a_fixed_order_export_and_engine_from_entry_points(parser):
    names = list(subcommands(parser))
    assert names == list(cli.COMMAND_ORDER), names
    assert not cli.build_parser()[1], "export/engine not registered: run .venv/bin/pip install --no-deps -e ."


def test_every_flag_has_help_and_the_rendered_help_shows_its_default(parser):
    for name, sub in subcommands(parser).items():
        rendered = " ".join(sub.format_help().split())
        formatter = sub._get_formatter()
        assert sub.description or name in ("query", "similar", "sample-catalog"), name
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = f"lookalike {name} {'/'.join(action.option_strings) or action.dest}"
            if action.help == argparse.SUPPRESS:  # only the deprecated spellings are hidden
                assert isinstance(action, cli._Deprecated), where
                assert not re.search(rf"(?<![\w-]){re.escape(action.option_strings[0])}(?![\w-])", rendered), where
                continue
            assert action.help and action.help.strip(), f"{where}: no help"
            text = " ".join(formatter._expand_help(action).split())
            assert text in rendered, where
            assert "(default: None)" not in text and "default: []" not in text, where
            switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
            if action.option_strings and not switch or action.nargs == argparse.OPTIONAL:
                assert re.search(r"\bdefault\b", text), f"{where}: its help does not say its default: {text!r}"
            if action.default not in (None, False, [], argparse.SUPPRESS) and not re.search(r"\bdefault\b", action.help):
                assert f"(default: {action.default})" in text, where


def test_units_and_defaults_where_the_issue_found_none(parser):
    subs = subcommands(parser)
    index = " ".join(subs["index"].format_help().split())
    assert "--batch-size IMAGES images per embedding request (default: 16)" in index
    assert "--concurrency REQUESTS embedding requests in flight per server (default: 4)" in index
    assert "--timeout SECONDS seconds" in index and "(default: 60.0)" in index
    assert "--protocol {grpc,http}" in index
    serve = " ".join(subs["serve"].format_help().split())
    assert "--http-port PORT" in serve and "(default: 8000)" in serve and "(default: 8003)" in serve
    query = " ".join(subs["query"].format_help().split())
    assert "--top-k K products returned per photo (1 to 1000) (default: 10)" in query
    evaluation = " ".join(subs["eval"].format_help().split())
    assert "(default: results/eval)" in evaluation and "--seed SEED random seed" in evaluation


def test_index_says_it_writes_into_the_local_model_repository_unless_milvus(parser):
    text = " ".join(subcommands(parser)["index"].format_help().split())
    assert "writes the new index version into the local --model-repository" in text
    assert "write access" in text and "milvus" in text


DEPRECATED = [
    (["index", "c.csv"], "--ef-search", "--hnsw-ef-search", "hnsw_ef_search", "96", 96),
    (["index", "c.csv"], "--nlist", "--ivfpq-nlist", "ivfpq_nlist", "64", 64),
    (["index", "c.csv"], "--m", "--ivfpq-m", "ivfpq_m", "8", 8),
    (["index", "c.csv"], "--nprobe", "--ivfpq-nprobe", "ivfpq_nprobe", "16", 16),
    (["eval", "c.csv"], "--concurrency", "--throughput-clients", "throughput_clients", "2", 2),
    (["engine"], "--images", "--catalog", "catalog", "cat.csv", Path("cat.csv")),
]


@pytest.mark.parametrize("before, old, new, dest, value, parsed", DEPRECATED, ids=[d[1] for d in DEPRECATED])
def test_old_spellings_still_parse_to_the_same_dest_with_a_warning_and_are_hidden(parser, capsys, before, old, new, dest,
                                                                                   value, parsed):
    assert getattr(parser.parse_args([*before, new, value]), dest) == parsed
    assert capsys.readouterr().err == ""
    assert getattr(parser.parse_args([*before, f"{old}={value}"]), dest) == parsed
    assert capsys.readouterr().err == f"lookalike {before[0]}: {old} is deprecated; use {new}\n"
    assert getattr(parser.parse_args(before), dest) in (None, 4)  # left out: the new flag's default
    shown = subcommands(parser)[before[0]].format_help()
    assert new in shown and not re.search(rf"(?<![\w-]){re.escape(old)}(?![\w-])", shown)


def test_index_options_reach_the_indexer_under_their_old_keys_and_index_speaks_http(tmp_path, monkeypatch, capsys):
    """--ivfpq-nlist etc. are the indexer's nlist/m/nprobe/ef_search; --protocol http, default port 8000."""
    import lookalike_client

    made, seen = [], {}

    class Client:
        def __init__(self, url, protocol="grpc", timeout_s=10.0):
            made.append((url, protocol, timeout_s))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def index_catalog(catalog, repository, clients, **kwargs):
        seen.update(kwargs["index_options"])
        raise ValueError("stopped here")

    monkeypatch.setattr(lookalike_client, "LookalikeClient", Client)
    monkeypatch.setattr("lookalike.indexing.indexer.index_catalog", index_catalog)
    code = cli.main(["index", str(tmp_path / "c.csv"), "--model-repository", str(tmp_path), "--protocol", "http",
                     "--timeout", "5", "--hnsw-m", "16", "--hnsw-ef-search", "64", "--ivfpq-nlist", "8", "--m", "4",
                     "--ivfpq-nprobe", "2"])
    assert code == 1 and "lookalike index: stopped here" in capsys.readouterr().err
    assert made == [("localhost:8000", "http", 5.0)]
    assert seen == {"hnsw_m": 16, "ef_search": 64, "nlist": 8, "m": 4, "nprobe": 2}


def test_version_is_the_installed_distributions_else_the_packages(capsys, monkeypatch):
    import importlib.metadata

    import lookalike

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"lookalike {importlib.metadata.version('lookalike')}\n"

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", absent)
    assert cli.version() == lookalike.__version__


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("command", ["info", "health"])
def test_info_and_health_of_an_unreachable_server_exit_1_with_a_message(capsys, command, protocol):
    url = f"127.0.0.1:{closed_port()}"
    assert cli.main([command, "--url", url, "--protocol", protocol, "--timeout", "1"]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if command == "info":
        assert f"lookalike info: the server at {url} ({protocol}) did not answer: ServerUnavailableError" in err
    else:
        assert "live         NO: " in out and "healthy      NO: not live" in out
        assert "trust the supervisor's /ready" in err  # the hint, when --supervisor is not given
    assert cli.main([command, "--url", url, "--protocol", protocol, "--timeout", "1", "--json"]) == 1
    if command == "health":
        answer = json.loads(capsys.readouterr().out)
        assert answer["healthy"] is False and answer["server"]["live"] is False and answer["server"]["error"]


class Supervisor(BaseHTTPRequestHandler):
    """GET /ready as `lookalike serve`'s supervisor answers it: 200 or 503, {"ready": ..., "reason": ...}."""

    answer = (503, {"ready": False, "reason": "the embedder's model process is dead"})

    def do_GET(self):  # noqa: N802 (http.server's name)
        code, body = self.answer if self.path == "/ready" else (404, {"error": "GET /ready"})
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def supervisor():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Supervisor)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_health_is_0_only_when_live_every_model_ready_and_the_supervisor_ready(supervisor, monkeypatch, capsys):
    import lookalike_client
    from lookalike_client.calls import SERVED_MODELS, Health

    address = f"127.0.0.1:{supervisor.server_address[1]}"
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # never through a proxy
    assert cli.supervisor_ready(address, 2.0) == (False, f"http://{address}/ready: HTTP 503, the embedder's model process is dead")

    healthy = Health(live=True, ready=False, models=dict.fromkeys(SERVED_MODELS, True))
    monkeypatch.setattr(lookalike_client.LookalikeClient, "health", lambda self: healthy)
    assert cli.main(["health", "--timeout", "2"]) == 0  # Triton's readiness is not the verdict
    assert "healthy      yes: live and every model ready" in capsys.readouterr().out
    assert cli.main(["health", "--timeout", "2", "--supervisor", address]) == 1
    out = capsys.readouterr().out
    assert "supervisor   NOT READY: " in out and "healthy      NO: the supervisor not ready" in out

    monkeypatch.setattr(Supervisor, "answer", (200, {"ready": True, "reason": "ready"}))
    assert cli.main(["health", "--timeout", "2", "--supervisor", f"http://{address}", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["healthy"] is True and answer["supervisor"]["ready"] is True

    one_down = Health(live=True, ready=True, models={**healthy.models, "embedder": False})
    monkeypatch.setattr(lookalike_client.LookalikeClient, "health", lambda self: one_down)
    assert cli.main(["health", "--timeout", "2", "--supervisor", address]) == 1
    assert "healthy      NO: embedder not ready" in capsys.readouterr().out

    with pytest.raises(SystemExit):
        cli.main(["health", "--supervisor", "nohostport"])
    assert "expected HOST:PORT" in capsys.readouterr().err


def test_lookalike_never_imports_lookalike_export():
    """The export package builds on lookalike; lookalike reaches export and engine only through entry points."""
    found = []
    for path in sorted((ROOT / "lookalike").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] == "lookalike_export"]
    assert not found, found


def test_the_entry_points_are_declared_and_name_register_functions():
    import tomllib

    import lookalike_export.cli

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][cli.COMMANDS_GROUP]
    assert declared == {"export": "lookalike_export.cli:register_export", "engine": "lookalike_export.cli:register_engine"}
    assert callable(lookalike_export.cli.register_export) and callable(lookalike_export.cli.register_engine)


def test_without_the_entry_points_help_works_and_export_says_what_is_missing(monkeypatch, capsys):
    monkeypatch.setattr(cli, "command_plugins", lambda: {})
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "export export an embedder to ONNX into the model repository [not installed]" in shown
    assert "engine build the embedder's TensorRT engine from its exported model.onnx [not installed]" in shown
    for argv in (["export", "--model", "resnet50"], ["engine", "--help"]):
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert f"lookalike {argv[0]}: not available here" in err and "pip install -e '.[export]'" in err
    assert cli.main(["health", "--url", f"127.0.0.1:{closed_port()}", "--timeout", "1"]) == 1  # the rest works

    def broken(subparsers):
        raise ImportError("No module named 'lookalike_export.engine'")

    monkeypatch.setattr(cli, "command_plugins", lambda: {"export": "ImportError: boom", "engine": broken})
    parser, missing = cli.build_parser()
    assert set(missing) == {"export", "engine"} and "ImportError: boom" in missing["export"]
    assert "registering it failed" in missing["engine"] and list(subcommands(parser)) == list(cli.COMMAND_ORDER)
