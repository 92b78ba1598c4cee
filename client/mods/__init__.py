"""Client mods: cross-cutting site behaviour as ``(msg, ctx, call_next)`` functions."""

from .egress import egress_log

__all__ = ["egress_log"]
