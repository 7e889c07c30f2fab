"""milterd's built-in plugins, importable as ``milterd_plugins``.

Each is registered in ``pyproject.toml`` under the entry-point group ``milterd.plugins``,
exactly as a third-party plugin registers itself.
"""
