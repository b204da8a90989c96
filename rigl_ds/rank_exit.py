"""Ending a distributed rank after its work is done, without the crash that CPython's interpreter
finalization can meet in a gloo worker thread.

A gloo worker thread (``ProcessGroupGloo::runLoop``) drops its reference to a finished collective,
and so to the collective's tensors, a moment after ``wait()`` has returned in the main thread. When
Python has already let go of those tensors, that drop frees their Python objects and must take the
GIL; if the interpreter is finalizing by then, CPython 3.11 ends the thread with ``pthread_exit``,
whose unwinding hits a noexcept destructor: std::terminate ("terminate called without an active
exception"), SIGABRT, exit 250 under the deepspeed launcher (core dump: ``~AsyncAllreduceWork`` ->
``TensorImpl::decref_pyobject`` -> ``take_gil`` -> ``PyThread_exit_thread``), after a run that wrote
everything. ``destroy_process_group()`` does not join those threads: DeepSpeed's data-parallel group
lives on in the engine, which its autograd hooks keep alive until module teardown, and gloo's
``shutdown()``/``abort()`` join nothing. So a finished rank runs its atexit handlers (logging, tqdm,
user handlers), flushes, and leaves before module teardown.
"""

from __future__ import annotations

import atexit
import os
import sys


def end_rank(code: int = 0) -> None:
    """Runs the atexit handlers, flushes, removes DeepSpeed's shm all-reduce workspace of this rank,
    and ends the process with ``code`` before interpreter finalization. Call it only after the
    rank's work is done and written (a failing rank should raise as usual)."""
    import threading

    for thread in threading.enumerate():  # as interpreter exit would: non-daemon threads finish first
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    _remove_deepspeed_shm_workspace()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _remove_deepspeed_shm_workspace() -> None:
    """DeepSpeed 0.19.8 creates a 69 MB /dev/shm all-reduce workspace per rank at init_distributed
    when every rank is on one node (CPU accelerator) and never unlinks it: repeated 2-rank runs had
    filled 20 of a 24 GB /dev/shm. Every peer mapped it during init_distributed, so the name can go."""
    name = "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), os.environ.get("RANK", "")
    )
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        pass


_GRACE_SECONDS = 0.25
_grace_installed = False


def install_exit_grace() -> None:
    """For scripts rigl_ds does not end itself (a user's script under the start-up hook): an atexit
    handler that gives gloo's worker threads a moment, with the GIL free, to drop their last
    references before finalization begins. atexit handlers run before CPython marks the interpreter
    as finalizing, so a worker taking the GIL then simply waits for it. Installed once per process,
    only where a gloo process group exists. It also removes DeepSpeed's shm workspace of the rank."""
    global _grace_installed
    if _grace_installed:
        return
    _grace_installed = True
    atexit.register(_exit_grace)


def _exit_grace() -> None:
    import time

    _remove_deepspeed_shm_workspace()
    time.sleep(_GRACE_SECONDS)


def uses_gloo() -> bool:
    """Whether this process's default torch.distributed group runs (partly) on gloo."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and "gloo" in str(dist.get_backend()).lower()
