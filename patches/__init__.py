"""Narrow, documented fixes for upstream library bugs."""
