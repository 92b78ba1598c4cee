"""Site-side differential privacy: DP-SGD, the site-owned privacy ledger, budget enforcement
and the empirical audit. Everything here runs at the site; nothing here talks to the server."""
