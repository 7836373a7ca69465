"""Objectives: each takes the model's output dict and returns a dict of named loss terms."""
