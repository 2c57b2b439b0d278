"""Directions and the files that hold them."""
