"""The ``Example:`` blocks of the package's docstrings run, with :mod:`doctest`, one test per module.

Every module of ``diffattn`` is imported and its docstrings' ``>>>`` examples run in the module's
namespace (as ``python -m doctest`` would), from a temporary working directory (an example may
write ``out.mp4``) and with torch's global state (RNG, grad mode, default dtype) restored after
each module. Examples whose output depends on timing or on the machine say ``# doctest: +SKIP``.

Run one module's examples with ``pytest tests/test_docstring_examples.py -k diffattn.runs``.
"""

from __future__ import annotations

import contextlib
import doctest
import importlib
import io
import pkgutil
import warnings

import pytest
import torch

import diffattn

OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

# Every module's examples run. A module whose examples cannot run yet goes here (xfail, strict:
# fixing them makes the test fail until the name leaves the set); one too slow for the suite
# goes to TOO_SLOW_YET (skipped). Both are empty and should stay so.
NOT_RUNNING_YET: set[str] = set()
TOO_SLOW_YET: set[str] = set()


def _modules_with_examples() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(diffattn.__path__, "diffattn."):
        if info.name.endswith(".__main__"):
            continue  # running it is the module's job; its docstrings are the command's help
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # an optional dependency (e.g. triton) is missing here
            continue
        try:
            if any(test.examples for test in doctest.DocTestFinder().find(module)):
                names.append(info.name)
        except ValueError:  # a malformed example: its module's test reports it
            names.append(info.name)
    return sorted(names + (["diffattn"] if doctest.DocTestFinder().find(diffattn)[0].examples else []))


MODULES = _modules_with_examples()


@contextlib.contextmanager
def _torch_state_restored():
    """An example may seed the RNG, turn off autograd or change the default dtype: none of that
    may leak into the next module (or the rest of the test session)."""
    grad, dtype = torch.is_grad_enabled(), torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        try:
            yield
        finally:
            torch.set_grad_enabled(grad)
            torch.set_default_dtype(dtype)


def _param(name: str):
    if name in TOO_SLOW_YET:
        return pytest.param(name, marks=pytest.mark.skip(reason="examples too slow for the suite yet"))
    if name in NOT_RUNNING_YET:
        return pytest.param(name, marks=pytest.mark.xfail(strict=True, reason="examples not runnable yet"))
    return name


@pytest.mark.parametrize("module_name", [_param(name) for name in MODULES])
def test_docstring_examples_run(module_name, tmp_path, monkeypatch):
    module = importlib.import_module(module_name)
    monkeypatch.chdir(tmp_path)
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    report = io.StringIO()
    with _torch_state_restored():
        for test in doctest.DocTestFinder().find(module):
            if test.examples:
                runner.run(test, out=report.write)
    assert runner.failures == 0, f"{runner.failures} of {runner.tries} examples failed:\n{report.getvalue()}"


def test_the_examples_are_found():
    # The mechanism itself: a module known to have examples is collected, and a broken example
    # is reported as a failure (not silently skipped).
    assert "diffattn.runs" in MODULES and "diffattn.errors" in MODULES
    broken = doctest.DocTestParser().get_doctest(">>> 1 + 1\n3\n", {}, "broken", None, 0)
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    runner.run(broken, out=lambda text: None)
    assert runner.failures == 1
