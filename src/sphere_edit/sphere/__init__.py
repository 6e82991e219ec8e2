"""The SPHERE projection and hyperspherical energy."""
