"""Test doubles the demo ships: an embedded Redis, local HUB and Platform servers, the demo itself."""
