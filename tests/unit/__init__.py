"""Unit tier: see README's Tests section."""
