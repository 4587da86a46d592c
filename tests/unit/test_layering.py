"""The package's layering, read from the import statements of every module (function-level imports too):

- rollout/ (engines and their protocol) never imports megatron, model/, checkpoint/, parallel/, sync/ or the
  trainer: it runs where no training does;
- model/ never imports checkpoint/, rollout/, sync/ or the trainer: the Megatron<->HF mapping is model-family
  knowledge and lives in model/;
- the policy role never imports the rollout role, nor the other way round; only the sync package and the
  loop see both.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_dapo"

# (modules under this prefix, may not import any of these prefixes)
FORBIDDEN = [
    (
        "megatron_dapo.rollout",
        (
            "megatron",
            "megatron_dapo.model",
            "megatron_dapo.checkpoint",
            "megatron_dapo.parallel",
            "megatron_dapo.sync",
            "megatron_dapo.trainer",
        ),
    ),
    (
        "megatron_dapo.model",
        ("megatron_dapo.checkpoint", "megatron_dapo.rollout", "megatron_dapo.sync", "megatron_dapo.trainer"),
    ),
    ("megatron_dapo.trainer.policy", ("megatron_dapo.trainer.rollout", "megatron_dapo.rollout")),
    ("megatron_dapo.trainer.rollout", ("megatron_dapo.trainer.policy", "megatron_dapo.sync")),
]
ROLES = ("megatron_dapo.trainer.policy", "megatron_dapo.trainer.rollout")
SEE_BOTH = ("megatron_dapo.sync", "megatron_dapo.trainer.loop", "megatron_dapo.trainer.setup")


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path) -> set[str]:
    """Every module a file imports, relative imports resolved; `from a import b` counts as a and a.b."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def violations(root: Path) -> list[str]:
    """One line per import that breaks a rule, for every module under `root` (a package directory)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        imported = imports_of(path, root)
        for prefix, banned in FORBIDDEN:
            if _within(module, prefix):
                found += [
                    f"{module} imports {name} (banned for {prefix})"
                    for name in sorted(imported)
                    if any(_within(name, b) for b in banned)
                ]
        roles = [role for role in ROLES if any(_within(name, role) for name in imported)]
        both = len(roles) == 2 and not any(_within(module, allowed) for allowed in SEE_BOTH)
        if both and not any(_within(module, role) for role in ROLES):
            found.append(f"{module} imports both roles: only {', '.join(SEE_BOTH)} may")
    return found


def test_the_package_keeps_its_layers():
    assert violations(PACKAGE) == []


def test_a_forbidden_import_is_caught(tmp_path):
    """The checker on a synthetic package: each kind of breach is reported, and a clean module is not."""
    root = tmp_path / "megatron_dapo"
    files = {
        "rollout/engine.py": "import megatron.core\nfrom megatron_dapo.model import arch\n",
        "rollout/client.py": "import aiohttp\nfrom megatron_dapo.rollout.types import SamplingParams\n",
        "model/build.py": "from ..checkpoint.hf_mapping import HFMapping\n",
        "trainer/policy/role.py": "from megatron_dapo.trainer.rollout.role import RolloutRole\n",
        "trainer/helper.py": "from .policy import role\nfrom .rollout import role as r\n",
        "trainer/loop.py": "from .policy import role\nfrom .rollout import role as r\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    found = violations(root)
    assert any(line.startswith("megatron_dapo.rollout.engine imports megatron.core") for line in found)
    assert any("megatron_dapo.rollout.engine imports megatron_dapo.model" in line for line in found)
    assert any("megatron_dapo.model.build imports megatron_dapo.checkpoint" in line for line in found)
    assert any(
        "megatron_dapo.trainer.policy.role imports megatron_dapo.trainer.rollout" in line for line in found
    )
    assert "megatron_dapo.trainer.helper imports both roles: only megatron_dapo.sync, " in "\n".join(found)
    assert not any(
        line.startswith(("megatron_dapo.rollout.client", "megatron_dapo.trainer.loop")) for line in found
    )
