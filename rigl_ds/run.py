"""``python -m rigl_ds.run SCRIPT [ARGS...]``: runs an unmodified training script with DeepSpeed made
rigl-aware for this process, so a ``"rigl"`` block in its DeepSpeed config trains sparse.

Works under the launchers users already type::

    deepspeed --num_gpus 8 --module rigl_ds.run train.py --deepspeed ds.json
    torchrun --nproc_per_node 8 -m rigl_ds.run train.py --deepspeed ds.json
    accelerate launch --config_file ds_accelerate.yaml -m rigl_ds.run train.py

``python -m rigl_ds.run -m package.module ARGS`` runs a module instead of a file. With rigl_ds
installed, the ``rigl_ds_autohook`` start-up hook does the same for scripts launched without this
wrapper (unless ``RIGL_DS_AUTOHOOK=0``); the wrapper works whatever that variable says.
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import List, Optional

USAGE = "usage: python -m rigl_ds.run SCRIPT [ARGS...]   or   python -m rigl_ds.run -m MODULE [ARGS...]"


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `deepspeed --module rigl_ds.run SCRIPT ...` puts its --local_rank=N before SCRIPT: hand it on.
    launcher_args = []
    while argv and (argv[0].startswith("--local_rank=") or argv[0].startswith("--local-rank=")):
        launcher_args.append(argv.pop(0))
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + __doc__.split("\n\n", 1)[1].strip(), file=sys.stderr if not argv else sys.stdout)
        sys.exit(0 if argv else 2)
    as_module = argv[0] == "-m"
    if as_module:
        argv = argv[1:]
        if not argv:
            sys.exit(USAGE)
    target, script_args = argv[0], launcher_args + argv[1:]
    if not as_module and not os.path.isfile(target):
        sys.exit(f"rigl_ds.run: no such script: {target}\n{USAGE}")

    import rigl_ds_autohook

    rigl_ds_autohook.install(force_mode="sparse")
    try:
        if as_module:
            sys.argv = [target, *script_args]
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            path = os.path.abspath(target)
            sys.argv = [target, *script_args]
            # As `python SCRIPT` would: the script's folder first on the path, not this process's cwd.
            sys.path[0] = os.path.dirname(path)
            runpy.run_path(path, run_name="__main__")
    except SystemExit as done:
        if done.code not in (None, 0):
            raise
    _end_finished_rank()


def _end_finished_rank() -> None:
    """The script finished: a rank with a gloo group ends before interpreter finalization, where a
    gloo worker thread can abort it after a successful run (see ``rigl_ds.rank_exit``)."""
    if "torch" not in sys.modules:
        return
    from rigl_ds import rank_exit

    if rank_exit.uses_gloo():
        rank_exit.end_rank(0)


if __name__ == "__main__":
    main()
