"""What tests import: live peers, sinks, a throwaway CA, Courier's processes, the servers' addresses.

Plain modules, no fixtures: fixtures live in the conftest.py files (tests/README.md).
"""
