"""Operator commands: schema migrations, re-wrapping secrets under a new key, the development database."""
