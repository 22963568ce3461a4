"""How git starts theta-store: `python -S -P <this file> ARGS...` (written by `theta-store install`).

git starts the filter process on every command that has to clean or smudge a checkpoint, and
`touch; git status` waits for it. Python's `site` runs every .pth file in site-packages at start,
which cost 39-56 ms of a 0.33 s `git status` on the machine of our benchmarks (a .pth there imports
certifi). Started with -S, this file puts this package's folder and the interpreter's
site-packages on sys.path without running .pth files. If a dependency can only be found through
one (an editable install of it, say), `site` runs after all, as it would have.
"""

import os
import sys


def _paths() -> None:
    import site
    from importlib.util import find_spec

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for p in [here, *site.getsitepackages()]:
        if p not in sys.path:
            sys.path.append(p)
    if any(find_spec(m) is None for m in ("dulwich", "msgpack", "numpy")):
        site.main()


if __name__ == "__main__":
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[0]  # started without -P: this package's modules must not shadow others
    if sys.flags.no_site:
        _paths()
    from theta_store.cli import main

    sys.exit(main())
