"""The pikvpress evaluation harness (``python -m evaluation``)."""
