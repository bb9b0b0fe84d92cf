"""Integration tier: see README's Tests section."""
