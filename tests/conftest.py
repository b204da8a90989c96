import hashlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# DeepSpeed JIT-builds its shm comm op at every init_distributed, into torch's extension cache, which
# every virtualenv of this user shares by default: two venvs testing at once rebuild it in turn (minutes
# each under load). Keep one cache per venv; subprocesses (launcher tests) inherit it.
if "TORCH_EXTENSIONS_DIR" not in os.environ:
    _tag = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    os.environ["TORCH_EXTENSIONS_DIR"] = str(Path.home() / ".cache" / "torch_extensions" / f"venv-{_tag}")
