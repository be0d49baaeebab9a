"""
Tests for nanoNSA. Run (CPU, Triton kernels under the interpreter):

    TRITON_INTERPRET=1 python -m pytest -q test_nsa.py
"""
import os

import pytest
import torch

import nsa_kernels as nk

# ---------------------------------------------------------------------------------------------
# Reference semantics and model (foundation)

# ---------------------------------------------------------------------------------------------
# Triton kernels
