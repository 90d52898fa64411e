"""Static checks of ansible/: ansible-lint (production profile, offline), the playbook's
syntax, and role READMEs that document every default variable."""

import re
import subprocess

import pytest
import yaml

from .conftest import ANSIBLE_DIR, ansible_env, tool

ROLES = sorted(p.name for p in (ANSIBLE_DIR / "roles").iterdir() if p.is_dir())


def run(cmd, tmp_path):
    return subprocess.run(cmd, cwd=ANSIBLE_DIR, env=ansible_env(tmp_path / "home"),
                          capture_output=True, text=True, timeout=300)


def test_ansible_lint_production_profile(tmp_path):
    proc = run([tool("ansible-lint"), "--offline", "--profile", "production", "--strict"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Profile 'production' was required, and it passed" in proc.stdout + proc.stderr


def test_playbook_syntax(tmp_path):
    proc = run([tool("ansible-playbook"), "--syntax-check", "-i", "inventory/hosts.yml", "site.yml"],
               tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_example_inventory_has_the_gateways_group(tmp_path):
    proc = run([tool("ansible-inventory"), "-i", "inventory/hosts.yml", "--graph", "gateways"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "@gateways:" in proc.stdout and "gw1.example.com" in proc.stdout


#: Variables the READMEs document that are the playbook's, not a role's.
PLAYBOOK_VARIABLES = {"gateway_manage_redis", "gateway_batch_size"}
_ROW = re.compile(r"^\| *`(\w+)` *\| *([^|]+?) *\| *(.+?) *\| *(.+?) *\|$", re.M)


def argument_spec(role):
    specs = yaml.safe_load((ANSIBLE_DIR / "roles" / role / "meta" / "argument_specs.yml").read_text())
    return specs["argument_specs"]["main"]["options"]


def readme_rows(role):
    """{variable: (type, default, meaning)} from the README's tables."""
    readme = (ANSIBLE_DIR / "roles" / role / "README.md").read_text()
    return {name: rest for name, *rest in _ROW.findall(readme)}


def _shown(value) -> str:
    """A plain default as the README writes it."""
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if value == "":
        return '`""`'
    return f"`{value}`" if not isinstance(value, (dict, list)) else f"`{'{}' if isinstance(value, dict) else '[]'}`"


@pytest.mark.parametrize("role", ROLES)
def test_argument_spec_covers_every_default(role):
    defaults = yaml.safe_load((ANSIBLE_DIR / "roles" / role / "defaults" / "main.yml").read_text())
    spec = argument_spec(role)
    assert sorted(set(defaults) ^ set(spec)) == [], f"{role}: defaults/main.yml and meta/argument_specs.yml differ"
    for name, option in spec.items():
        assert option.get("type") and option.get("description"), f"{role}: {name} has no type or description"


@pytest.mark.parametrize("role", ROLES)
def test_role_readme_matches_the_argument_spec(role):
    """Every variable of the spec in the README with the spec's type, its choices, and the plain
    default of defaults/main.yml; nothing in the README that the spec does not know."""
    spec = argument_spec(role)
    defaults = yaml.safe_load((ANSIBLE_DIR / "roles" / role / "defaults" / "main.yml").read_text())
    rows = readme_rows(role)
    assert sorted(set(spec) - set(rows)) == [], f"{role}/README.md misses these variables"
    assert sorted(set(rows) - set(spec) - PLAYBOOK_VARIABLES) == [], f"{role}/README.md documents unknown variables"
    for name, option in spec.items():
        kind, default, meaning = rows[name]
        expected = option["type"] + (f" of {option['elements']}" if "elements" in option else "")
        assert kind == expected, f"{role}/README.md: {name} is {kind!r}, the spec says {expected!r}"
        for choice in option.get("choices", []):
            assert re.search(rf"\b{re.escape(str(choice))}\b", meaning), f"{role}/README.md: {name} misses {choice}"
        value = defaults[name]
        if not (isinstance(value, str) and "{{" in value):
            assert default == _shown(value), f"{role}/README.md: {name} default {default}, defaults/main.yml {value!r}"


def test_ansible_doc_prints_the_role_spec(tmp_path):
    proc = run([tool("ansible-doc"), "-t", "role", "-r", "roles", "xcflushd"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in argument_spec("xcflushd"):
        assert name in proc.stdout, f"ansible-doc shows no {name}"


def test_the_collection_installs_self_contained(tmp_path, installed_collection):
    """Built by `make collection`, installed by ansible-galaxy: the release verifier, the
    pinned key and the systemd files are real files inside it, and Ansible finds its roles."""
    root = installed_collection / "ansible_collections" / "threescale" / "xcflushd"
    files = root / "roles" / "xcflushd" / "files"
    for name in ("signing/__main__.py", "signing/RELEASE_KEY_FINGERPRINT", "systemd/xcflushd.service"):
        assert (files / name).is_file() and not (files / name).is_symlink(), name
    assert not [p for p in root.rglob("*") if p.is_symlink()]
    assert (root / "meta" / "runtime.yml").is_file() and (root / "playbooks" / "site.yml").is_file()
    env = dict(ansible_env(tmp_path / "home"), ANSIBLE_COLLECTIONS_PATH=str(installed_collection))
    env.pop("ANSIBLE_CONFIG")
    proc = subprocess.run([tool("ansible-doc"), "-t", "role", "threescale.xcflushd.xcflushd"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "xcflushd_provider_key" in proc.stdout, proc.stdout + proc.stderr


def test_the_example_inventory_pins_this_checkouts_version():
    import xcflushd

    group_vars = yaml.safe_load((ANSIBLE_DIR / "inventory" / "group_vars" / "all.yml").read_text())
    assert group_vars["xcflushd_version"] == xcflushd.__version__


def test_the_walkthrough_shows_the_example_inventory_as_it_is():
    # The walk-through copies ansible/inventory and shows its files: they must be the same.
    from .walkthrough import REPO, blocks

    found = blocks()
    files = {name.split(" ", 1)[1]: text for name, text in found.items() if name.startswith("file ")}
    assert set(files) == {"ansible/inventory/group_vars/all.yml", "ansible/inventory/group_vars/gateways.yml"}
    for path, text in files.items():
        assert (REPO / path).read_text() == text, f"the docs show another {path}"
    # What tests/deploy/test_deploy_rollout.py runs.
    assert {"inventory", "vault", "check", "canary", "rollout", "resume", "rollback", "collection",
            "own-key"} <= set(found)
