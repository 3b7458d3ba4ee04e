"""docker/Dockerfile's pip step keeps the base image's torch (`docker build` cannot run here).

The image's torch is a CUDA pre-release build (BASE_TORCH in the Dockerfile). Checked without
network: (1) every torch requirement the image installs admits BASE_TORCH, (2) the extras the
image installs hold nothing compiled against torch, (3) pip runs under constraints made by
docker/base_constraints.py, and (4) pip's real resolver, offered the base torch and a newer
generic torch wheel, keeps the base one under those constraints (and fails on the old floor)."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCKERFILE = os.path.join(REPO, "docker", "Dockerfile")
NGC_25_01_TORCH = "2.6.0a0+ecf3bae40a"  # the former base; sorts below plain "2.6"


def _dockerfile() -> str:
    with open(DOCKERFILE) as f:
        return f.read()


def _base_torch() -> str:
    m = re.search(r"^ARG BASE_TORCH=(\S+)", _dockerfile(), re.M)
    assert m, "docker/Dockerfile must declare ARG BASE_TORCH=<the base image's torch.__version__>"
    return m.group(1)


def _project_install_extras() -> list[str]:
    """Extras of the `pip install ... -e ".[...]"` step in the Dockerfile."""
    m = re.search(r'pip install [^\n]*-e "\.(?:\[([^\]]*)\])?"', _dockerfile())
    assert m, "no `pip install ... -e \".[extras]\"` step in docker/Dockerfile"
    return [e.strip() for e in (m.group(1) or "").split(",") if e.strip()]


def _image_requirements() -> list[Requirement]:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in _project_install_extras():
        assert extra in project["optional-dependencies"], f"Dockerfile installs unknown extra {extra}"
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


def _base_constraints():
    spec = importlib.util.spec_from_file_location("base_constraints",
                                                  os.path.join(REPO, "docker", "base_constraints.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _torch_reqs() -> list[Requirement]:
    return [r for r in _image_requirements() if canonicalize_name(r.name) == "torch"]


def test_torch_floor_admits_base_image_torch():
    torch_reqs = _torch_reqs()
    assert torch_reqs, "the project must declare its torch requirement"
    for version in (_base_torch(), NGC_25_01_TORCH):
        for r in torch_reqs:
            assert r.specifier.contains(Version(version), prereleases=True), \
                f"{r} rejects the base image's torch {version}: pip would replace it"


def test_image_extras_hold_nothing_built_against_torch():
    keep = _base_constraints().KEEP
    bound = [str(r) for r in _image_requirements()
             if canonicalize_name(r.name) in keep and canonicalize_name(r.name) != "torch"]
    assert not bound, f"the image would pip-install torch-bound packages {bound}; the base provides them"
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert "deepspeed" not in extras


def test_dockerfile_installs_under_base_constraints():
    text = _dockerfile()
    gen = re.search(r"base_constraints\.py[^\n]*>\s*(\S+)", text)
    env = re.search(r"^ENV PIP_CONSTRAINT=(\S+)", text, re.M)
    assert gen and env, "the Dockerfile must write base constraints and set PIP_CONSTRAINT"
    assert gen.group(1) == env.group(1) and gen.start() < env.start(), \
        "PIP_CONSTRAINT must name the file base_constraints.py wrote"
    installs = [m.start() for m in re.finditer(r"\bpip install\b", text)]
    assert installs and all(i > env.start() for i in installs), "a pip install runs before the pins"
    assert "/etc/pip/constraint.txt" in text[:env.start()], "NGC's own pins must be kept too"


def test_base_constraints_pin_installed_torch():
    import torch

    out = subprocess.run([sys.executable, os.path.join(REPO, "docker", "base_constraints.py")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    pins = out.stdout.split()
    assert f"torch=={torch.__version__}" in pins
    assert all(canonicalize_name(p.split("==")[0]) in _base_constraints().KEEP for p in pins)


def _fake_wheel(folder, name: str, version: str, requires=()) -> None:
    dist_info = f"{name}-{version}.dist-info"
    meta = "".join(["Metadata-Version: 2.1\n", f"Name: {name}\n", f"Version: {version}\n",
                    *(f"Requires-Dist: {r}\n" for r in requires)])
    files = {f"{dist_info}/METADATA": meta,
             f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                   "Tag: py3-none-any\n"}
    files[f"{dist_info}/RECORD"] = "".join(f"{p},,\n" for p in files) + f"{dist_info}/RECORD,,\n"
    with zipfile.ZipFile(os.path.join(folder, f"{name}-{version}-py3-none-any.whl"), "w") as z:
        for path, body in files.items():
            z.writestr(path, body)


def _resolve(tmp_path, torch_reqs, base_torch):
    """pip's resolver, offline: an index holding the base torch and a newer generic torch, a probe
    package with the image's torch requirements, and the constraint the Dockerfile generates."""
    index = tmp_path / f"index-{len(list(tmp_path.iterdir()))}"
    index.mkdir()
    _fake_wheel(index, "torch", base_torch)
    _fake_wheel(index, "torch", "2.13.0")  # what a plain `pip install` would upgrade to
    _fake_wheel(index, "sora_dist_probe", "0.1", [str(r) for r in torch_reqs])
    constraints = index / "constraints.txt"
    constraints.write_text(f"torch=={base_torch}\n")  # = docker/base_constraints.py in the image
    report = index / "report.json"
    env = dict(os.environ, PIP_CONSTRAINT=str(constraints), PIP_CONFIG_FILE=os.devnull,
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
                        "--no-index", "--find-links", str(index), "--report", str(report),
                        "sora_dist_probe"], capture_output=True, text=True, env=env, timeout=120)
    if r.returncode:
        return None, r.stdout + r.stderr
    picked = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
              for i in json.loads(report.read_text())["install"]}
    return picked, r.stdout


def test_pip_resolver_keeps_base_torch(tmp_path):
    torch_reqs = _torch_reqs()
    for base in (_base_torch(), NGC_25_01_TORCH):
        picked, log = _resolve(tmp_path, torch_reqs, base)
        assert picked is not None, f"pip cannot keep the base torch {base}:\n{log[-2000:]}"
        assert picked["torch"] == base, f"pip would replace torch {base} by {picked['torch']}"
    # The check has teeth: the former floor rejects NGC 25.01's torch (the build would fail
    # under the pins; without them pip replaced torch).
    picked, _ = _resolve(tmp_path, [Requirement("torch>=2.6")], NGC_25_01_TORCH)
    assert picked is None
