"""Shared building blocks of the methods (pure PyTorch / numpy)."""
