"""Validation, backend choice and autograd Functions, one module per operation."""
