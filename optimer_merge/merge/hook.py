"""Registers the `optimer` method as soon as mergekit's method registry finishes importing.

Imported at interpreter start by `optimer_merge_hook.pth`, so the stock `mergekit-yaml` script
finds `merge_method: optimer`. Kept import-light: it imports neither torch nor mergekit itself.
"""

import importlib.util
import sys

_TARGET = "mergekit.merge_methods"


def _register() -> None:
    if "optimer_merge.merge.mergekit_method" in sys.modules:
        return  # being imported right now: it registers itself when it finishes
    from optimer_merge.merge.mergekit_method import register

    register()


class _RegisterAfterImport:
    """A meta-path finder that wraps the target module's loader to register right after it."""

    def find_spec(self, name, path=None, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    if _TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


install()
