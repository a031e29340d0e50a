# Puts the repository root on sys.path for the tests (pytest rootdir conftest).
