"""A non-editable install ships every package: the wheels of ./client and . (what the serving image's
`pip install --no-deps ./client .` installs) go into a scratch venv, which then runs `lookalike --help`
and imports every module of the source tree's lookalike/, export/ (as lookalike_export) and
client/lookalike_client/.

The editable install of `make setup` finds modules in the checkout whatever pyproject.toml lists, so only
a built wheel shows a subpackage that package discovery missed (the model stubs import
lookalike.serving.*, the CLI finds `export` and `engine` through the entry points the wheel declares).

No registry is needed: the wheels are built with --no-build-isolation from this interpreter's setuptools
and installed with --no-deps --no-index; the third-party packages come from this venv's site-packages,
listed by a .pth file after the scratch venv's own. A plain path in a .pth does not run that directory's
.pth files, so the editable finders of this venv (`__editable__*`) stay inactive there: the test checks
that lookalike, lookalike_export and lookalike_client are the scratch venv's copies.
No server: the unit tier, though the two builds, the venv and importing torch take 12-18 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = ("lookalike", "lookalike_export", "lookalike_client")
SOURCES = {"lookalike": ROOT / "lookalike", "lookalike_export": ROOT / "export",  # package -> source folder
           "lookalike_client": ROOT / "client" / "lookalike_client"}
BUILD_INPUTS = ("pyproject.toml", "setup.py", "setup.cfg", "README.md", "LICENSE", "NOTICE", "MANIFEST.in",
                "client/", "lookalike/", "export/")

PROBE = textwrap.dedent("""
    import importlib, json, sys

    FIRST_PARTY = set(sys.argv[2].split(","))
    out = {"prefix": sys.prefix, "files": {}, "failed": {}, "third_party_missing": {}}
    for name in json.loads(sys.argv[1]):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a third-party module this venv lacks too (tensorrt): not packaging
            top = (exc.name or "").split(".")[0]
            if top and top not in FIRST_PARTY:
                out["third_party_missing"][name] = str(exc)
            else:
                out["failed"][name] = f"{type(exc).__name__}: {exc}"
            continue
        except BaseException as exc:  # noqa: BLE001 - reported
            out["failed"][name] = f"{type(exc).__name__}: {exc}"
            continue
        if name in FIRST_PARTY:
            out["files"][name] = module.__file__
    print(json.dumps(out))
""")


def source_modules() -> list[str]:
    """Every module of the source tree, by walking its files (a folder without __init__.py included:
    discovery would miss it, and so must this test not)."""
    names = []
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = path.relative_to(folder).with_suffix("").parts
            names.append(".".join((package, *(parts[:-1] if parts[-1] == "__init__" else parts))))
    return sorted(set(names))


def copy_checkout(dest: Path) -> None:
    """What a fresh clone builds from: git's files (and this checkout's new, not ignored ones), no build
    leftovers (build/, *.egg-info), so that the build writes nothing into the repository."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"not a git checkout, or no git, to list the files a clone has: {exc}")
    for name in listed:
        if name.startswith(BUILD_INPUTS) and (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


def run(command: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_the_wheels_install_non_editable_and_ship_every_module(tmp_path):
    for module in ("pip", "venv", "setuptools"):
        if run([sys.executable, "-c", f"import {module}"], tmp_path).returncode != 0:
            pytest.skip(f"{sys.executable} has no {module}: cannot build and install the wheels")

    src, wheels, venv, cwd = tmp_path / "src", tmp_path / "wheels", tmp_path / "venv", tmp_path / "cwd"
    for folder in (src, wheels, cwd):
        folder.mkdir()
    copy_checkout(src)
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                 "-w", str(wheels), str(src / "client"), str(src)], cwd)
    assert built.returncode == 0, f"pip wheel failed:\n{built.stdout[-3000:]}{built.stderr[-3000:]}"
    files = sorted(wheels.glob("*.whl"))
    assert {f.name.split("-")[0] for f in files} == {"lookalike", "lookalike_client"}, [f.name for f in files]

    (lookalike_wheel,) = (f for f in files if f.name.startswith("lookalike-"))
    with zipfile.ZipFile(lookalike_wheel) as wheel:
        shipped = set(wheel.namelist())
    dist_info = next(n.split("/")[0] for n in shipped if n.split("/")[0].endswith(".dist-info"))
    for legal in ("LICENSE", "NOTICE"):  # setuptools ships them in the dist-info (license_files' defaults)
        if (ROOT / legal).is_file():
            assert any(n.startswith(dist_info + "/") and n.endswith("/" + legal) for n in shipped), \
                f"{legal} is not in {lookalike_wheel.name}'s {dist_info}"
    entry_points = wheel_text(lookalike_wheel, f"{dist_info}/entry_points.txt")
    assert "[lookalike.commands]" in entry_points, f"the wheel declares no lookalike.commands entry points:\n{entry_points}"

    made = run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd, timeout=120)
    assert made.returncode == 0, made.stderr[-2000:]
    python = venv / "bin" / "python"
    installed = run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                     *map(str, files)], cwd)
    assert installed.returncode == 0, f"pip install failed:\n{installed.stdout[-3000:]}{installed.stderr[-3000:]}"
    scratch_site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd).stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (scratch_site / "_lookalike_test_deps.pth").write_text("\n".join(sorted(ours)) + "\n")  # after the scratch site

    modules = source_modules()
    probe = run([str(python), "-c", PROBE, json.dumps(modules), ",".join(FIRST_PARTY)], cwd)  # cwd: not the repository
    assert probe.returncode == 0, probe.stderr[-3000:]
    out = json.loads(probe.stdout.strip().splitlines()[-1])
    for name in FIRST_PARTY:
        where = out["files"].get(name)
        assert where and Path(where).resolve().is_relative_to(venv.resolve()), \
            f"{name} was imported from {where}, not from the scratch venv {venv}"
    assert not out["failed"], ("modules of the source tree that the installed wheel cannot import (a subpackage that "
                               "package discovery left out?):\n  " + "\n  ".join(f"{k}: {v}" for k, v in out["failed"].items()))

    helped = run([str(venv / "bin" / "lookalike"), "--help"], cwd, timeout=120)
    assert helped.returncode == 0, f"lookalike --help exited {helped.returncode}:\n{helped.stdout[-2000:]}{helped.stderr[-2000:]}"
    for command in ("serve", "index", "query", "export", "engine"):
        assert command in helped.stdout, f"`lookalike --help` of the installed wheel lists no {command}:\n{helped.stdout}"
    for command in ("export", "engine"):  # registered through the wheel's entry points
        sub = run([str(venv / "bin" / "lookalike"), command, "--help"], cwd, timeout=120)
        assert sub.returncode == 0 and "--model-repository" in sub.stdout, \
            f"`lookalike {command} --help` exited {sub.returncode}:\n{sub.stdout[-2000:]}{sub.stderr[-2000:]}"
    if out["third_party_missing"]:
        print("not importable here for want of a third-party package (as in the development venv):",
              out["third_party_missing"])


def wheel_text(wheel: Path, member: str) -> str:
    with zipfile.ZipFile(wheel) as opened:
        return opened.read(member).decode() if member in opened.namelist() else ""
