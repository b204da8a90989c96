"""Makes ``deepspeed.initialize`` honour a ``"rigl"`` block in any process, unmodified scripts included.

Installed with rigl_ds as ``rigl_ds_autohook.pth``, so Python runs ``import rigl_ds_autohook`` at
start-up. That import costs microseconds and imports nothing but the standard library: it only
puts a finder on ``sys.meta_path`` that waits for ``deepspeed`` (and ``transformers.trainer``) to be
imported and then patches them through ``rigl_ds.integrations.autopatch``. A process that never
imports DeepSpeed never imports rigl_ds or torch because of this file.

``RIGL_DS_AUTOHOOK`` chooses what a ``"rigl"`` block does where the script itself did not ask for
rigl_ds:

- unset or ``1`` (default): ``deepspeed.initialize`` trains sparse, and a ``transformers.Trainer``
  gets rigl_ds's callback (``rigl/*`` log entries, masks in its checkpoints);
- ``0``: nothing is patched to train sparse, but DeepSpeed is still guarded: an engine built from a
  config with a ``"rigl"`` block to which rigl_ds was never attached stops at its first step with an
  error saying how to enable rigl_ds. It never trains dense in silence.

``python -m rigl_ds.run`` installs the same hook explicitly, in ``sparse`` mode, whatever the
variable says (for installs without the ``.pth``, such as a source tree on ``PYTHONPATH``).
"""

from __future__ import annotations

import os
import sys
import threading

ENV = "RIGL_DS_AUTOHOOK"
_WATCHED = ("deepspeed", "transformers.trainer")
_local = threading.local()


def mode() -> str:
    """``"sparse"`` or ``"guard"`` (see the module docstring)."""
    forced = getattr(sys.modules[__name__], "_forced_mode", None)
    if forced:
        return forced
    return "guard" if os.environ.get(ENV, "1").strip().lower() in ("0", "off", "false", "no") else "sparse"


class _PostImportLoader:
    """Runs the real loader, then the patch for that module."""

    def __init__(self, loader, name: str) -> None:
        self._loader, self._name = loader, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _patch(self._name, module)

    def __getattr__(self, attr):
        return getattr(self._loader, attr)


class _Finder:
    """A meta-path finder that only wraps the loaders of the watched modules."""

    def find_spec(self, name, path=None, target=None):
        if name not in _WATCHED or getattr(_local, "busy", False):
            return None
        import importlib.util

        _local.busy = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            _local.busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _PostImportLoader(spec.loader, name)
        return spec


def _patch(name: str, module) -> None:
    try:
        from rigl_ds.integrations import autopatch
    except Exception as exc:  # a broken rigl_ds install must not break every DeepSpeed job's import
        sys.stderr.write(f"rigl_ds_autohook: rigl_ds is not importable ({exc!r}); {name} left unpatched\n")
        return
    autopatch.patch(name, module)


def install(force_mode: str | None = None) -> None:
    """Puts the finder in place (once) and patches watched modules that are already imported."""
    if force_mode is not None:
        sys.modules[__name__]._forced_mode = force_mode
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    for name in _WATCHED:
        module = sys.modules.get(name)
        if module is not None:
            _patch(name, module)


install()
