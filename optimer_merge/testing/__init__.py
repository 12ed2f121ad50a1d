"""Test and demo helpers: deterministic tiny Gemma 3 models. Production code never imports this."""
