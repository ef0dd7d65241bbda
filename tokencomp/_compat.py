"""Standard-library features that moved between the Python versions tokencomp supports."""

import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # Python 3.10 has no tomllib (the tomli dependency, see pyproject.toml)

__all__ = ["tomllib"]
