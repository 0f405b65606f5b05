import os
import sys

# bnb_ref.py (shared ground-truth helpers) sits beside the tests.
sys.path.insert(0, os.path.dirname(__file__))
