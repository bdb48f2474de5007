class AnyType(str):
    """The any-type trick: a type name that equals every other."""
    def __ne__(self, other):
        return False


class ContainsAnything(dict):
    """The any-input trick: an optional section that claims every name."""
    def __contains__(self, key):
        return True
