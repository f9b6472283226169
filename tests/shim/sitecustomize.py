# TEST-ONLY: tests put this directory on PYTHONPATH for the script subprocesses so they get
# the same stand-ins as the in-process tests (see ldm_test_fallbacks.py).
import ldm_test_fallbacks

ldm_test_fallbacks.install()
