"""Roundhouse: code shared by the router, worker and manager services.

Services import `protos` and this package, never each other.
"""
