"""Federation logic: strategies, wrappers, wire-protocol constants (no torch training loops)."""
