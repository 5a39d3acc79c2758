"""Ray shells of the library's workers: a few lines each, so the logic and its tests stay in ``afil_ray``."""
