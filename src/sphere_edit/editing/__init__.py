"""The editing core: requests, keys, v*, key statistics, the session and its journal,
presets, and building a session from names. Imports nothing from ``bench`` or ``cli``."""
