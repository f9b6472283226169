"""scripts/check_oldest_stack.sh tests the lower bounds setup.py declares: its pins must be them."""
import ast
import re

from packaging.version import Version

from conftest import REPO


def lower_bounds():
    tree = ast.parse((REPO / "setup.py").read_text())
    (call,) = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup"]
    (requires,) = [k.value for k in call.keywords if k.arg == "install_requires"]
    bounds = {}
    for requirement in ast.literal_eval(requires):
        name, _, version = requirement.partition(">=")
        if version:
            bounds[name.strip()] = Version(version)
    return bounds


def script_pins():
    text = (REPO / "scripts" / "check_oldest_stack.sh").read_text()
    (array,) = re.findall(r"OLDEST=\(([^)]*)\)", text)
    return {name: Version(version) for name, version in (pin.split("==") for pin in array.split())}


def test_every_lower_bound_is_what_the_oldest_stack_check_installs():
    bounds, pins = lower_bounds(), script_pins()
    assert {"torch", "transformers", "pytorch-lightning", "tokenizers"} <= set(bounds)
    assert bounds == {name: pins.get(name) for name in bounds}, (bounds, pins)
