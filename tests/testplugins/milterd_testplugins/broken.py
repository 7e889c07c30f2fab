"""A plugin that cannot even be imported: installed, never enabled by a working config."""

raise ImportError("t_broken is broken on purpose")
