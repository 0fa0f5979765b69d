"""Helpers shared by the tests: ports, throwaway database servers, `runyard server` processes.

Import them as `from helpers.ports import free_port` (tests/ is on sys.path through tests/conftest.py).
"""
