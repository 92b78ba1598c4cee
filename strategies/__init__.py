"""Server-side federation logic: Flower strategy wrappers and the strategy registry (no torch
training loops; what the site shares with the server lives in ``protocol``)."""
