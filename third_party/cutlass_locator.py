"""Find the CUTLASS include directories for the build.

The root is ``$CUTLASS_DIR`` when set (a CUTLASS checkout), else the ``source/`` directory that the ``nvidia-cutlass``
PyPI package installs inside ``cutlass_library``. ``setup.py`` imports this file by path; CMake runs it as a script,
which prints the include directories separated by ``;`` (a CMake list).
"""

import importlib.util
import os
import sys

_MARKER = os.path.join("include", "cutlass", "cutlass.h")


class CutlassNotFoundError(RuntimeError):
    """Raised when no usable CUTLASS header tree can be found."""


def cutlass_root() -> str:
    """Return the CUTLASS root: the directory holding ``include/cutlass/cutlass.h``."""
    env_root = os.environ.get("CUTLASS_DIR")
    if env_root:
        if not os.path.isfile(os.path.join(env_root, _MARKER)):
            raise CutlassNotFoundError(f"CUTLASS_DIR={env_root} is not a CUTLASS checkout: {_MARKER} is missing there")
        return os.path.abspath(env_root)

    # find_spec locates the package without running its __init__, which imports much of cutlass_library.
    spec = importlib.util.find_spec("cutlass_library")
    for location in (spec.submodule_search_locations or []) if spec else []:
        root = os.path.join(location, "source")
        if os.path.isfile(os.path.join(root, _MARKER)):
            return root
    raise CutlassNotFoundError(
        "CUTLASS headers not found: run `pip install nvidia-cutlass`, or set CUTLASS_DIR to a CUTLASS checkout"
    )


def cutlass_include_dirs() -> list[str]:
    """Return ``[<root>/include, <root>/tools/util/include]``."""
    root = cutlass_root()
    return [os.path.join(root, "include"), os.path.join(root, "tools", "util", "include")]


if __name__ == "__main__":
    try:
        print(";".join(cutlass_include_dirs()))
    except CutlassNotFoundError as error:
        print(f"cutlass_locator: {error}", file=sys.stderr)
        sys.exit(1)
