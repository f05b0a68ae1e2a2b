"""The imagefleet operator (kopf): ImageGenerator resources to pods, router, status and autoscaling.

Installed as ``imagefleet.operator``. The standard library also has a module named ``operator``;
nothing imports this folder by its bare name. Where the repository root comes first on
``sys.path`` (``python -m ...`` or ``PYTHONPATH=.`` from the root), a bare ``import operator``
would find this folder before the standard library, so the guard below hands that import the
standard library's module instead.
"""

if __name__ == "operator":  # pragma: no cover - only when shadowing the standard library
    import os as _os
    import sys as _sys
    from importlib.machinery import SourceFileLoader as _Loader  # loaded at start-up: no cycle

    _path = _os.path.join(_os.path.dirname(_os.__file__), "operator.py")
    _stdlib = type(_sys)("operator")
    _stdlib.__file__ = _path
    _Loader("operator", _path).exec_module(_stdlib)
    _sys.modules["operator"] = _stdlib
    globals().update({k: v for k, v in vars(_stdlib).items() if not k.startswith("__")})
