"""System tier: see README's Tests section."""
