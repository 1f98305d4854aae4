"""Helper modules and fixtures the tests share (`from support.train_helpers import ...`; tests/conftest.py puts
tests/ on sys.path)."""
