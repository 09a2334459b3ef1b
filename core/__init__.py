"""mixgrpo.core: interfaces, data types, plugin manager, configuration, rollout, trainer, CLI.

No model code lives here; everything concrete is a plugin.
"""
