"""Scale-out support: strategy presets' classes, per-block sharding, ZeRO-3 forward-mode AD, memory planner."""
