"""Security posture checks that need no server: no committed secrets, checkpoints loaded
weights-only, loopback by default, every accepted checkov finding justified in
docs/SECURITY.md. Non-root images and checkov itself: tests/rehearsal/test_images.py and
tests/chart/test_chart.py; the live bind address: tests/reliability/test_faults.py."""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
from pathlib import Path

import yaml

from mnist_pipeline.cli import cli
from mnist_pipeline.serve import LocalTriton

REPO = Path(__file__).resolve().parents[2]

# Built from pieces so that this file does not match its own patterns.
_BEGIN = "-----BEGIN "
SECRET_PATTERNS = {
    "private key": re.compile(_BEGIN + r"(?:RSA |EC |DSA |OPENSSH |ENCRYPTED |PGP )?PRIVATE KEY"),
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "GitHub token": re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,})"),
    "Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    "Google API key": re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"),
    "JWT": re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"),
    "credentials in a URL": re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:[^/\s@'\"]+@"),
    "assigned password/secret/token": re.compile(
        r"(?i)\b(?:password|passwd|secret|api[_-]?key|access[_-]?token|auth[_-]?token)\b"
        r"[\"']?\s*[:=]\s*[\"'][^\"'\s]{8,}[\"']"
    ),
}


def find_secrets(text: str) -> list[str]:
    return [
        f"{kind}: {match.group(0)[:24]}…"
        for kind, pattern in SECRET_PATTERNS.items()
        for match in pattern.finditer(text)
    ]


def tracked_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout
    return [REPO / name for name in listed.decode().split("\0") if name]


def test_no_secrets_in_tracked_files() -> None:
    found = []
    files = tracked_files()
    assert len(files) > 20, "git ls-files listed almost nothing"
    for path in files:
        if not path.is_file() or path.suffix in {".gz", ".png"}:
            continue
        content = path.read_bytes()
        if b"\0" in content[:8192]:
            continue  # binary
        found += [f"{path.relative_to(REPO)}: {hit}" for hit in find_secrets(content.decode())]
    assert found == []


def test_the_secret_scan_catches_what_it_looks_for() -> None:
    planted = [
        _BEGIN + "OPENSSH PRIVATE KEY-----",
        "AKIA" + "ABCDEFGHIJKLMNOP",
        "ghp_" + "a1" * 18,
        'password = "' + "hunter2hunter2" + '"',
        "https://user:" + "s3cretpass@registry.example.com/",
        "eyJhbGciOiJIUzI1NiJ9." + "eyJzdWIiOiIxMjM0NTY3ODkwIn0." + "abcdefghijklmnop",
    ]
    for text in planted:
        assert find_secrets(text), text
    # What the project legitimately holds: value references, not values.
    for text in [
        "password: {{ .Values.password }}",
        "token = os.environ['TOKEN']",
        "secretKeyRef:",
    ]:
        assert not find_secrets(text), text


def torch_load_calls(tree: ast.AST) -> list[ast.Call]:
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "load"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "torch"
    ]


def test_checkpoints_are_loaded_weights_only_everywhere() -> None:
    """Unpickling runs code: every torch.load in the package must pass weights_only=True,
    and nothing may unpickle otherwise."""
    calls = 0
    for path in sorted((REPO / "src").rglob("*.py")):
        source = path.read_text()
        tree = ast.parse(source)
        for call in torch_load_calls(tree):
            calls += 1
            weights_only = [k for k in call.keywords if k.arg == "weights_only"]
            assert (
                weights_only
                and isinstance(weights_only[0].value, ast.Constant)
                and weights_only[0].value.value is True
            ), f"{path}:{call.lineno}: torch.load without weights_only=True"
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not {"pickle", "dill", "cloudpickle", "joblib"} & set(names), (
                    f"{path}:{node.lineno}: unpickling module imported"
                )
    assert calls >= 2, "train and export load checkpoints: the scan found none"


def test_servers_bind_to_loopback_by_default() -> None:
    assert inspect.signature(LocalTriton).parameters["host"].default == "127.0.0.1"
    for command in ("serve", "run"):
        (host,) = [p for p in cli.commands[command].params if p.name == "host"]
        assert host.default == "127.0.0.1", command


def test_every_checkov_skip_is_justified_in_the_security_doc() -> None:
    skips = yaml.safe_load((REPO / "deploy" / "helm" / "checkov-skips.yaml").read_text())
    doc = (REPO / "docs" / "SECURITY.md").read_text()
    assert skips, "the skip file lists nothing"
    for skip in skips:
        assert skip["reason"].strip()
        assert skip["check"] in doc, f"{skip['check']} is not explained in docs/SECURITY.md"
