"""A pack whose requirement is missing: it fails to import, and the others still load."""
import sdflow_test_requirement_that_is_not_installed  # noqa: F401

NODE_CLASS_MAPPINGS = {}
