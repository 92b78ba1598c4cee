"""Real deployment: coordinator (SuperLink), site daemons (SuperNodes), run submission."""
