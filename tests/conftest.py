"""Shared pytest setup: tests run on CPU, from the repository root, deterministically."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project is flat files at the root, not a package
torch.set_num_threads(min(2, torch.get_num_threads()))
